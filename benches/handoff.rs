//! Shard handoff: the cost of moving one authenticated connection to its home shard.
//!
//! - `channel_wake`: one message through a shard's bounded crossbeam inbox plus the doorbell
//!   (`AtomicWaker`) to a monoio runtime on another thread that is asleep in its driver,
//!   measured as a round trip (the reply comes back on a plain channel). This is the latency
//!   a handed-off connection waits, dominated by the cross-thread wake-up.
//! - `channel_batch_1000`: a burst of 1000 messages, the consumer draining and coalescing
//!   wakes: the per-handoff cost under load.
//! - `dup_and_register`: `dup` of a connected socket's descriptor and its registration with a
//!   monoio runtime (`TcpStream::from_std`), then close — the socket work of a handoff.

use criterion::{criterion_group, criterion_main, Criterion};
use std::future::poll_fn;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::task::Poll;
use switchboard::shard::{channels, InboxRx, ShardMsg};

fn consumer(rx: InboxRx, reply: crossbeam_channel::Sender<usize>) {
    let (rx, bell) = rx;
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().expect("runtime");
    rt.block_on(async move {
        loop {
            let mut n = 0;
            while let Ok(msg) = rx.try_recv() {
                if matches!(msg, ShardMsg::Shutdown { .. }) {
                    return;
                }
                n += 1;
            }
            if n > 0 {
                let _ = reply.send(n);
            }
            poll_fn(|cx| {
                bell.register(cx.waker());
                if rx.is_empty() {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
        }
    });
}

fn revoke() -> ShardMsg {
    ShardMsg::RevokeAgent { user: "user-1".into(), agent_id: "ag_0123456789abcdef".into() }
}

fn bench_channel(c: &mut Criterion) {
    let (mut inboxes, mut rxs) = channels(1);
    let inbox = Arc::new(inboxes.remove(0));
    let rx = rxs.remove(0);
    let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
    let t = std::thread::spawn(move || consumer(rx, reply_tx));
    c.bench_function("handoff/channel_wake", |b| {
        b.iter(|| {
            assert!(inbox.send(revoke()).is_ok());
            reply_rx.recv().expect("reply");
        })
    });
    c.bench_function("handoff/channel_batch_1000", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                while inbox.send(revoke()).is_err() {
                    std::hint::spin_loop();
                }
            }
            let mut got = 0;
            while got < 1000 {
                got += reply_rx.recv().expect("reply");
            }
        })
    });
    let _ = inbox.send(ShardMsg::Shutdown { deadline: std::time::Instant::now() });
    t.join().expect("consumer");
}

fn bench_socket(c: &mut Criterion) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().expect("runtime");
    c.bench_function("handoff/dup_and_register", |b| {
        b.iter(|| {
            rt.block_on(async {
                // SAFETY: F_DUPFD_CLOEXEC returns a fresh descriptor that we then own.
                let fd = unsafe { libc::fcntl(server.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
                assert!(fd >= 0);
                let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
                let s = monoio::net::TcpStream::from_std(std_stream).expect("register");
                drop(s);
            })
        })
    });
    drop(client);
}

criterion_group!(benches, bench_channel, bench_socket);
criterion_main!(benches);
