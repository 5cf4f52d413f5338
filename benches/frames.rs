//! Outbound frames: building a `message` frame around 64 B, 1 KiB and 16 KiB of `data`
//! (one allocation, one copy of `data`), and the fan-out cost of sharing one built frame with
//! 1, 10 and 100 recipients' outbound queues (`Bytes::clone` into a `VecDeque<Bytes>`, then the
//! writer's drop), which is all a broadcast costs per recipient after the frame is built.

use std::collections::VecDeque;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::protocol::frames;

fn json_string_of_len(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    v.push(b'"');
    v.resize(n - 1, b'x');
    v.push(b'"');
    v
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_frame");
    for size in [64usize, 1024, 16 * 1024] {
        let data = json_string_of_len(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| black_box(frames::message_to_client(black_box("ag_7f3kQ9x"), black_box(data))))
        });
    }
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let frame = frames::message_to_client("ag_7f3kQ9x", &json_string_of_len(1024));
    let mut g = c.benchmark_group("fanout_clone");
    for n in [1usize, 10, 100] {
        let mut queues: Vec<VecDeque<Bytes>> = (0..n).map(|_| VecDeque::with_capacity(16)).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                for q in queues.iter_mut() {
                    q.push_back(black_box(&frame).clone());
                }
                for q in queues.iter_mut() {
                    black_box(q.pop_front());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, build, fanout);
criterion_main!(benches);
