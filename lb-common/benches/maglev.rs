//! Time to build one 65537-slot Maglev ring: the control-plane cost of every backend change.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb_common::{
    DEFAULT_RING_SIZE,
    addr::v4_mapped,
    maglev::{MaglevBackend, build_ring},
};

fn backends(n: u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend::new(i, v4_mapped([10, 1, (i >> 8) as u8, i as u8]), 8080, 1))
        .collect()
}

fn ring_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build_65537");
    group.sample_size(20);
    for n in [10, 100, 1000] {
        let set = backends(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| build_ring(set, DEFAULT_RING_SIZE).expect("prime ring"));
        });
    }
    group.finish();
}

criterion_group!(benches, ring_build);
criterion_main!(benches);
