#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xlb_fuzz_checks::control::check_request_stream(data));
