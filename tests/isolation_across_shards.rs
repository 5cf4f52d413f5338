//! With several shards, random traffic among many users arrives exactly once, at exactly the
//! right connections, in order per sender and recipient, and never at another user's; a
//! user's connections accepted on different shards reach each other.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use switchboard::client::{AgentConn, ClientConn, Event, TokenPlace};

const USERS: usize = 50;
const AGENTS: usize = 2;
const CLIENTS: usize = 3;
const SENDS_PER_CONN: usize = 10;

enum Conn2 {
    Agent(AgentConn),
    Client(ClientConn),
}

struct Node {
    user: usize,
    /// agent_id or session id: what recipients see in `from`.
    id: String,
    conn: Conn2,
    /// Recipient-side record: sender id -> sequence numbers in arrival order.
    got: BTreeMap<String, Vec<u64>>,
    expected_msgs: usize,
    expected_acks: usize,
    acks: usize,
    sent: u64,
}

impl Node {
    fn recv(&mut self, t: Duration) -> Event {
        match &mut self.conn {
            Conn2::Agent(a) => a.recv(t),
            Conn2::Client(c) => c.recv(t),
        }
    }
}

#[test]
fn random_traffic_among_fifty_users_on_four_shards_is_exact_and_isolated() {
    let d = Daemon::start(DaemonOpts {
        shards: 4,
        config_toml: "[limits]\nmessages_per_sec_per_user = 10000\nmessages_burst_per_user = 10000\n".into(),
        hs256_secret: Some("isolation-test-secret-0123456789".into()),
    });
    let secret = d.jwt_secret();
    let mut nodes: Vec<Node> = Vec::new();
    let mut agents_of: Vec<Vec<usize>> = vec![Vec::new(); USERS];
    let mut clients_of: Vec<Vec<usize>> = vec![Vec::new(); USERS];
    let node = |user, id: String, conn| Node {
        user,
        id,
        conn,
        got: BTreeMap::new(),
        expected_msgs: 0,
        expected_acks: 0,
        acks: 0,
        sent: 0,
    };
    for (u, mine) in agents_of.iter_mut().enumerate() {
        for k in 0..AGENTS {
            let cred = d.hmac_agent(&format!("user-{u}"), &format!("agent-{k}"));
            let a = d.agent(&cred);
            mine.push(nodes.len());
            nodes.push(node(u, cred.agent_id().to_string(), Conn2::Agent(a)));
        }
    }
    let exp = switchboard::client::unix_now() + 3600;
    for (u, mine) in clients_of.iter_mut().enumerate() {
        for _ in 0..CLIENTS {
            let t = mint(&secret, &json!({"sub": format!("user-{u}"), "exp": exp}));
            let c = ClientConn::connect(d.addr, &t, TokenPlace::Header, None).unwrap();
            mine.push(nodes.len());
            nodes.push(node(u, c.session.clone(), Conn2::Client(c)));
        }
    }
    // Every agent learns its user's three sessions before traffic starts.
    for u in 0..USERS {
        let sessions: Vec<String> = clients_of[u].iter().map(|&i| nodes[i].id.clone()).collect();
        for &ai in &agents_of[u] {
            let Conn2::Agent(a) = &mut nodes[ai].conn else { unreachable!() };
            let mut known: Vec<String> = a.welcome.value["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            while !sessions.iter().all(|s| known.contains(s)) {
                let f = expect_type(a, "session");
                assert_eq!(f.value["open"], json!(true));
                assert!(
                    sessions.contains(&f.str("session").to_string()),
                    "another user's session: {}",
                    f.text
                );
                known.push(f.str("session").to_string());
            }
        }
    }

    // Random interleaving of every connection's sends.
    let mut rng = Rng::new(0x5eed_1234);
    let mut order: Vec<usize> =
        (0..nodes.len()).flat_map(|i| std::iter::repeat_n(i, SENDS_PER_CONN)).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for &i in &order {
        let u = nodes[i].user;
        nodes[i].sent += 1;
        let n = nodes[i].sent;
        let with_id = rng.below(3) == 0;
        let id = format!("{}-{n}", nodes[i].id);
        let from = nodes[i].id.clone();
        let data = json!({"u": format!("user-{u}"), "from": from, "n": n});
        let recipients: Vec<usize> = match &nodes[i].conn {
            Conn2::Agent(_) => {
                if rng.below(2) == 0 {
                    clients_of[u].clone()
                } else {
                    vec![clients_of[u][rng.below(CLIENTS)]]
                }
            }
            Conn2::Client(_) => vec![agents_of[u][rng.below(AGENTS)]],
        };
        let to = if recipients.len() > 1 { None } else { Some(nodes[recipients[0]].id.clone()) };
        let idref = with_id.then_some(id.as_str());
        match &mut nodes[i].conn {
            Conn2::Agent(a) => a.send(to.as_deref(), &data, idref).unwrap(),
            Conn2::Client(c) => c.send(to.as_deref(), &data, idref).unwrap(),
        }
        if with_id {
            nodes[i].expected_acks += 1;
        }
        for r in recipients {
            nodes[r].expected_msgs += 1;
        }
    }

    // Read everything back.
    let ids: HashMap<String, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.clone(), i)).collect();
    for i in 0..nodes.len() {
        let user = format!("user-{}", nodes[i].user);
        let mut msgs = 0;
        while msgs < nodes[i].expected_msgs || nodes[i].acks < nodes[i].expected_acks {
            let f = match nodes[i].recv(Duration::from_secs(10)) {
                Event::Frame(f) => f,
                other => panic!(
                    "node {i} ({user}) got {other:?} after {msgs}/{} messages, {}/{} acks",
                    nodes[i].expected_msgs, nodes[i].acks, nodes[i].expected_acks
                ),
            };
            match f.ty() {
                "message" => {
                    let data: &Value = &f.value["data"];
                    assert_eq!(data["u"], json!(user), "a message crossed users: {}", f.text);
                    let from = f.str("from");
                    assert_eq!(data["from"], json!(from), "from does not name the sender: {}", f.text);
                    let sender = ids.get(from).unwrap_or_else(|| panic!("unknown sender in {}", f.text));
                    assert_eq!(nodes[*sender].user, nodes[i].user);
                    let n = data["n"].as_u64().unwrap();
                    nodes[i].got.entry(from.to_string()).or_default().push(n);
                    msgs += 1;
                }
                "ack" => nodes[i].acks += 1,
                _ => panic!("node {i} ({user}): unexpected frame {}", f.text),
            }
        }
        // In order per sender, each exactly once.
        for (from, seq) in &nodes[i].got {
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "node {i}: out of order or duplicated from {from}: {seq:?}"
            );
        }
        // Nothing more is pending for this connection.
        let pong = match &mut nodes[i].conn {
            Conn2::Agent(a) => {
                a.ws.ping().unwrap();
                next_frame(a, WAIT)
            }
            Conn2::Client(c) => {
                c.ws.ping().unwrap();
                next_frame(c, WAIT)
            }
        };
        assert_eq!(pong.ty(), "pong", "node {i}: extra frame {}", pong.text);
    }
}

#[test]
fn a_users_connections_on_different_shards_reach_each_other() {
    let d = Daemon::start(DaemonOpts { shards: 4, ..Default::default() });
    let t = d.token("u1", &[], "1h");
    let creds: Vec<_> = (0..4).map(|k| d.hmac_agent("u1", &format!("a{k}"))).collect();
    let mut agents: Vec<AgentConn> = creds.iter().map(|c| d.agent(c)).collect();
    // Eight sessions from eight source ports: SO_REUSEPORT spreads them over the shards.
    let mut clients: Vec<ClientConn> = (0..8).map(|_| d.client(&t, None)).collect();
    for a in agents.iter_mut() {
        for _ in 0..clients.len() {
            expect_type(a, "session");
        }
    }
    for (ci, c) in clients.iter_mut().enumerate() {
        for cred in &creds {
            c.send(Some(cred.agent_id()), &json!({"c": ci}), None).unwrap();
        }
    }
    for a in agents.iter_mut() {
        let mut from: Vec<String> =
            (0..clients.len()).map(|_| expect_type(a, "message").str("from").to_string()).collect();
        from.sort();
        let mut want: Vec<String> = clients.iter().map(|c| c.session.clone()).collect();
        want.sort();
        assert_eq!(from, want);
        for c in &clients {
            a.send(Some(&c.session), &json!("direct"), None).unwrap();
        }
        a.send(None, &json!("broadcast"), None).unwrap();
    }
    // Order holds per sender; different senders may interleave.
    for c in clients.iter_mut() {
        let mut per_sender: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for _ in 0..creds.len() * 2 {
            let f = expect_type(c, "message");
            per_sender.entry(f.str("from").to_string()).or_default().push(f.value["data"].clone());
        }
        for cred in &creds {
            assert_eq!(per_sender.get(cred.agent_id()), Some(&vec![json!("direct"), json!("broadcast")]));
        }
    }
}
