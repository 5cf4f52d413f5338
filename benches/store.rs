//! Store benchmarks: the writer's group commit (1, 64 and 1024 ops per transaction, applied
//! directly and through the writer thread) and the handshake's credential read.
//!
//! Must stay true: the environment lives under Cargo's target tmp dir (a real disk, normally),
//! not /tmp, which is often tmpfs and would make the durable commit look free. Run with
//! `cargo bench --bench store`; `cargo test --bench store` runs each once as a smoke test.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use switchboard::store::{spawn_writer, NewCredential, Store, WriteOp};

const AGENTS: usize = 1024;

fn setup() -> (tempfile::TempDir, Store, Vec<String>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = Store::open(dir.path(), 64).expect("open store");
    let ids = (0..AGENTS)
        .map(|i| {
            let user = format!("user{}", i % 100);
            store.create_agent(&user, "bench", NewCredential::Hmac, None).expect("create").0.agent_id
        })
        .collect();
    (dir, store, ids)
}

fn ops(ids: &[String], n: usize, at: u64) -> Vec<WriteOp> {
    (0..n).map(|i| WriteOp::AgentSeen { agent_id: ids[i % ids.len()].clone(), at: at + i as u64 }).collect()
}

fn writer(c: &mut Criterion) {
    let (_dir, store, ids) = setup();
    let mut group = c.benchmark_group("store_commit");
    group.sample_size(20);
    let mut at = 1_000_000u64;
    for n in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("apply_batch", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    at += n as u64;
                    ops(&ids, n, at)
                },
                |batch| black_box(store.apply_batch(&batch).expect("commit")),
                BatchSize::SmallInput,
            )
        });
    }
    // Through the thread: n sends, then a flush that waits for the commit.
    let handle = spawn_writer(store.clone());
    for n in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("writer_send_flush", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    at += n as u64;
                    ops(&ids, n, at)
                },
                |batch| {
                    for op in batch {
                        assert!(handle.send(op));
                    }
                    assert!(handle.flush());
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    handle.shutdown();
}

fn reads(c: &mut Criterion) {
    let (_dir, store, ids) = setup();
    let mut group = c.benchmark_group("store_read");
    let mut i = 0usize;
    group.bench_function("get_agent", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            black_box(store.get_agent(&ids[i]).expect("read").expect("present"))
        })
    });
    group.bench_function("get_agent_missing", |b| {
        b.iter(|| black_box(store.get_agent("ag_AAAAAAAAAAAAAAAAAAAAAA").expect("read")))
    });
    group.bench_function("agents_of_user_10", |b| {
        b.iter(|| black_box(store.agents_of_user("user42").expect("read")))
    });
    group.finish();
}

criterion_group!(benches, writer, reads);
criterion_main!(benches);
