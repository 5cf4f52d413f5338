//! Turns the threads' observations into the accounting (what was sent, what arrived where,
//! what the relay reported) and the latency figures.
//!
//! Every (message, expected recipient) pair lands in exactly one bucket:
//! - `delivered`: the recipient got it (once);
//! - `dropped_reported`: not received, and the relay answered the send with `error`;
//! - `lost_on_closed_connection`: not received, no `error`, but the sender or the recipient
//!   was closed by the relay (the close code is the relay's report) or never connected;
//! - `lost_unreported`: not received, no `error`, both ends alive — a real loss.
//!
//! A run fails (non-zero exit) on any unreported loss, any message delivered to another user
//! or to the wrong connection, any duplicate, any reordering within a stream, a message the
//! generator never sent, an unreadable payload, a wrong `from`, or a send on a live
//! connection that the relay never answered (neither `ack` nor `error`).

use crate::engine::{RecvStream, ThreadResult, BROADCAST};
use crate::plan::Plan;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Accounting {
    /// `send` frames written.
    pub sent: u64,
    /// Sends answered with `ack` (the relay took and handed them over: inbound frames relayed).
    pub acked: u64,
    /// Sends answered with `error` (the relay's drops), by code.
    pub answered_error: BTreeMap<String, u64>,
    /// Every `error` frame received, by code (with or without an id).
    pub error_frames: BTreeMap<String, u64>,
    /// Sends with neither `ack` nor `error` at the end, on connections that stayed open.
    pub unanswered_live: u64,
    /// The same, on connections the relay closed.
    pub unanswered_closed: u64,
    /// (message, recipient) pairs expected from what was sent.
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub dropped_reported: u64,
    pub lost_on_closed_connection: u64,
    pub lost_unreported: u64,
    /// Received although the send was answered with `error`.
    pub delivered_despite_error: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Delivered to a connection of another user (must be 0).
    pub wrong_user: u64,
    /// Delivered to the wrong connection of the right user.
    pub misdirected: u64,
    /// `from` did not name the sender.
    pub from_mismatch: u64,
    /// Received with a sequence number that was never sent.
    pub phantom: u64,
    pub unparseable: u64,
    /// `ack`/`error` frames whose id matched no send in flight.
    pub unexpected_answers: u64,
    /// Connections the relay closed (or that broke) during the run, by reason.
    pub closes: BTreeMap<String, u64>,
    /// Other frames received, by type (presence, session, pong, token_expiring …).
    pub other_frames: BTreeMap<String, u64>,
}

impl Accounting {
    /// The reasons this run must fail; empty when it is clean.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                f.push(format!("{n} {what}"));
            }
        };
        check(self.lost_unreported, "messages lost without a report from the relay");
        check(self.wrong_user, "messages delivered to another user");
        check(self.misdirected, "messages delivered to the wrong connection");
        check(self.duplicates, "duplicate deliveries");
        check(self.out_of_order, "deliveries out of order");
        check(self.phantom, "deliveries of messages never sent");
        check(self.unparseable, "messages with an unreadable payload");
        check(self.from_mismatch, "messages with a wrong `from`");
        check(self.unanswered_live, "sends never answered (no ack, no error) on open connections");
        check(self.unexpected_answers, "acks or errors for no send in flight");
        f
    }
}

fn bump(m: &mut BTreeMap<String, u64>, k: &str, n: u64) {
    *m.entry(k.to_string()).or_default() += n;
}

pub fn account(plan: &Plan, results: &[ThreadResult]) -> Accounting {
    let mut a = Accounting::default();
    let mut recv: HashMap<(u32, u32, u32), &RecvStream> = HashMap::new();
    let mut dead: HashSet<usize> = HashSet::new();
    let mut connected: HashSet<usize> = HashSet::new();
    for r in results {
        for (k, v) in &r.recv_streams {
            recv.insert(*k, v);
        }
        dead.extend(r.dead.iter().map(|(i, _)| *i));
        connected.extend(r.connected.iter().copied());
        for (k, v) in &r.error_codes {
            bump(&mut a.error_frames, k, *v);
        }
        for (k, v) in &r.closes {
            bump(&mut a.closes, k, *v);
        }
        for (k, v) in &r.other_frames {
            bump(&mut a.other_frames, k, *v);
        }
        a.wrong_user += r.wrong_user;
        a.misdirected += r.misdirected;
        a.from_mismatch += r.from_mismatch;
        a.unparseable += r.unparseable;
        a.unexpected_answers += r.unexpected_answers;
        a.duplicates += r.duplicates;
        a.out_of_order += r.out_of_order;
    }
    let gone = |i: usize| dead.contains(&i) || !connected.contains(&i);
    let mut matched: HashMap<(u32, u32, u32), u64> = HashMap::new();
    for r in results {
        for s in &r.send_streams {
            a.sent += s.sent;
            a.acked += s.acked;
            for (_, code) in &s.errors {
                bump(&mut a.answered_error, code, 1);
            }
            let sender = s.sender as usize;
            if gone(sender) {
                a.unanswered_closed += s.unanswered.len() as u64;
            } else {
                a.unanswered_live += s.unanswered.len() as u64;
            }
            let errors: HashSet<u64> = s.errors.iter().map(|(q, _)| *q).collect();
            let recipients: Vec<usize> = if s.target == BROADCAST {
                plan.users[plan.conns[sender].user].clients.clone()
            } else {
                vec![s.target as usize]
            };
            for rcp in recipients {
                let key = (s.sender, s.target, rcp as u32);
                let rs = recv.get(&key);
                let closed = gone(sender) || gone(rcp);
                let mut got = 0;
                for q in 1..=s.sent {
                    a.expected_deliveries += 1;
                    let received = rs.is_some_and(|rs| rs.has(q));
                    let err = errors.contains(&q);
                    if received {
                        got += 1;
                        a.delivered += 1;
                        if err {
                            a.delivered_despite_error += 1;
                        }
                    } else if err {
                        a.dropped_reported += 1;
                    } else if closed {
                        a.lost_on_closed_connection += 1;
                    } else {
                        a.lost_unreported += 1;
                    }
                }
                matched.insert(key, got);
            }
        }
    }
    for (k, rs) in &recv {
        a.phantom += rs.count - matched.get(k).copied().unwrap_or(0);
    }
    a
}

/// Every thread's latency histogram merged (ns).
pub fn merged_hist(results: &[ThreadResult]) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("histogram bounds");
    for r in results {
        h.add(&r.hist).expect("same bounds");
    }
    h
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

pub fn latency(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        p99_9_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
        mean_us: h.mean() / 1000.0,
    }
}

/// Latency percentiles of one second of the run (µs; None where nothing arrived).
#[derive(Debug, Clone, Serialize)]
pub struct SecLatency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
}

/// The threads' per-second latency histograms merged, second by second.
pub fn latency_series(results: &[ThreadResult]) -> Vec<Option<SecLatency>> {
    let secs = results.iter().map(|r| r.lat_per_sec.len()).max().unwrap_or(0);
    (0..secs)
        .map(|i| {
            let mut h = crate::engine::sec_hist();
            for r in results {
                if let Some(x) = r.lat_per_sec.get(i) {
                    h.add(x).expect("same bounds");
                }
            }
            (!h.is_empty()).then(|| SecLatency {
                count: h.len(),
                p50_us: h.value_at_quantile(0.5) as f64,
                p90_us: h.value_at_quantile(0.9) as f64,
                p99_us: h.value_at_quantile(0.99) as f64,
                p99_9_us: h.value_at_quantile(0.999) as f64,
                max_us: h.max() as f64,
            })
        })
        .collect()
}

/// Least-squares slope of y over x (None with fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Element-wise sum of per-second series.
pub fn sum_series<'a>(series: impl Iterator<Item = &'a Vec<u64>>) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for s in series {
        if out.len() < s.len() {
            out.resize(s.len(), 0);
        }
        for (o, v) in out.iter_mut().zip(s) {
            *o += v;
        }
    }
    out
}

pub fn merge_maps<'a>(maps: impl Iterator<Item = &'a BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for m in maps {
        for (k, v) in m {
            bump(&mut out, k, *v);
        }
    }
    out
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: f64) -> String {
    let n = n.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 5.0)]), None);
        let flat = [(0.0, 10.0), (1.0, 11.0), (2.0, 9.0), (3.0, 10.0)];
        assert!(slope(&flat).unwrap().abs() < 0.5);
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(-1234.0), "-1,234");
    }
}
