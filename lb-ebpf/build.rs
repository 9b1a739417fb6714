//! Link options for the BPF object (bpf-linker).

fn main() {
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which leaves memset and
    // memmove with no expansion at all: every zeroed struct and many copies became calls to
    // a byte-at-a-time loop (56 iterations to clear one parse result, on every packet).
    // LLVM's generic expansion turns constant-size ones into a few wide stores instead.
    println!("cargo::rustc-link-arg=--disable-expand-memcpy-in-order");
}
