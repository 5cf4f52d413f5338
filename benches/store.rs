//! Store benchmarks: the writer's group commit (1, 64 and 1024 ops per transaction, applied
//! directly and through the writer thread), the handshake's credential read, and connection
//! records (64 and 1024 opens or closes per transaction, a retention pass, listing).
//!
//! Must stay true: the environment lives under Cargo's target tmp dir (a real disk, normally),
//! not /tmp, which is often tmpfs and would make the durable commit look free. Run with
//! `cargo bench --bench store`; `cargo test --bench store` runs each once as a smoke test.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use switchboard::store::{
    spawn_writer, ConnectionFilter, ConnectionRecord, NewCredential, RetentionPolicy, Role, Store, WriteOp,
};

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

/// A realistic record: an agent connection or a client session bound to an agent.
fn record(i: u64, ids: &[String]) -> ConnectionRecord {
    // Real ids are random: scramble i.
    let r = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let (conn_id, role) =
        if i % 2 == 0 { (format!("c_{r:016x}"), Role::Agent) } else { (format!("s_{r:016x}"), Role::Client) };
    let agent = ids[i as usize % ids.len()].clone();
    let user = format!("user{}", i % 100);
    let remote = format!("203.0.113.{}:{}", i % 256, 1024 + i % 60_000);
    ConnectionRecord::new(conn_id, user, role, Some(agent), remote, 1_700_000_000 + i / 100)
}

fn opens(ids: &[String], from: u64, n: usize) -> Vec<WriteOp> {
    (from..from + n as u64).map(|i| WriteOp::ConnectionOpened(Box::new(record(i, ids)))).collect()
}

fn closes(ids: &[String], from: u64, n: usize) -> Vec<WriteOp> {
    (from..from + n as u64)
        .map(|i| {
            let rec = record(i, ids);
            WriteOp::ConnectionClosed {
                conn_id: rec.conn_id,
                opened: rec.opened,
                last_seen: rec.opened + 60,
                closed: rec.opened + 61,
                frames_in: 1234,
                frames_out: 5678,
                bytes_in: 123_456,
                bytes_out: 567_890,
                close_code: Some(1000),
            }
        })
        .collect()
}

fn connection_records(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = Store::open(dir.path(), 2048).expect("open store");
    let ids: Vec<String> = (0..AGENTS / 8)
        .map(|i| {
            store
                .create_agent(&format!("user{i}"), "bench", NewCredential::Hmac, None)
                .expect("create")
                .0
                .agent_id
        })
        .collect();
    let mut next = 0u64;
    let mut group = c.benchmark_group("connection_commit");
    group.sample_size(20);
    for n in [64usize, 1024] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("opened", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    next += n as u64;
                    opens(&ids, next - n as u64, n)
                },
                |batch| black_box(store.apply_batch(&batch).expect("commit")),
                BatchSize::SmallInput,
            )
        });
        // A close rewrites its row: open them first (not measured).
        group.bench_with_input(BenchmarkId::new("closed", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    next += n as u64;
                    store.apply_batch(&opens(&ids, next - n as u64, n)).expect("open");
                    closes(&ids, next - n as u64, n)
                },
                |batch| black_box(store.apply_batch(&batch).expect("commit")),
                BatchSize::SmallInput,
            )
        });
    }
    // One retention pass deleting the 1024 oldest rows.
    group.throughput(Throughput::Elements(1024));
    group.bench_function("prune/1024", |b| {
        b.iter_batched(
            || {
                let keep = store.connection_count().expect("count");
                next += 1024;
                store.apply_batch(&opens(&ids, next - 1024, 1024)).expect("open");
                RetentionPolicy::new(keep, 36_500)
            },
            |policy| black_box(store.prune_connections(&policy, 0, 4096).expect("prune")),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    drop(store);

    // Listing scans newest first: measure it on a store at the default bound (100 000 rows).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = Store::open(dir.path(), 2048).expect("open store");
    for from in (0..100_000u64).step_by(1000) {
        store.apply_batch(&opens(&ids, from, 1000)).expect("fill");
    }
    let mut group = c.benchmark_group("connection_list_100k");
    group.sample_size(20);
    let filter = |user: Option<&str>, agent: Option<&str>| ConnectionFilter {
        user: user.map(Into::into),
        agent: agent.map(Into::into),
        limit: Some(100),
    };
    for (name, filter) in [
        ("newest_100", filter(None, None)),
        // 1 row in 100 matches: scans ~10 000.
        ("user_newest_100", filter(Some("user7"), None)),
        // 1 row in 128 matches: scans ~12 800.
        ("agent_newest_100", filter(None, Some(&ids[3]))),
        // Nothing matches: scans all 100 000 (the worst case of `connections --user`).
        ("unknown_user_full_scan", filter(Some("nobody"), None)),
    ] {
        group.bench_function(name, |b| b.iter(|| black_box(store.list_connections(&filter).expect("list"))));
    }
    group.finish();
}

criterion_group!(benches, writer, reads, connection_records);
criterion_main!(benches);
