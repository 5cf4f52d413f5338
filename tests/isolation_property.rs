//! Isolation as a property: random programs of users, HMAC agents, clients (random `agents`
//! allowlists in the token, random `agent=` bindings), connects, disconnects, revocations and
//! sends, run against one 4-shard daemon per case and checked step by step against a model of
//! spec §3.3, §4.3 and §5: every delivery the model allows happens, at exactly the
//! connections it predicts and in order; nothing else arrives anywhere; refusals and errors
//! (`forbidden`, `unauthorized`, `offline`, `not_allowed`, `bad_frame`) are the model's.
//!
//! The model also predicts every `welcome`, `presence` and `session` frame (the offline grace
//! is 0 so presence follows connections at once). After every step each live connection is
//! sent a protocol `ping`, and its next frame must be the `pong`: whatever arrived before it
//! and was not predicted fails the case.
//!
//! Offline delivery (spec §8) is turned off for these daemons (`history.max_messages = 0`,
//! `mailbox.max_messages = 0`); messages still carry `seq`/`epoch`, which the model ignores.
//!
//! Deterministic given the seed (printed; `ISOLATION_SEED=<n>` replays, `ISOLATION_CASES=<n>`
//! runs more cases). A failure prints the seed, the minimal program and the trace of its run.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Instant;

static STATS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
use switchboard::client::{
    unix_now, AgentConn, AgentCredential, ClientConn, ClientOpts, Event, TokenPlace, Ws,
};

/// An agent named by a step: the k-th of the acting user's own agents, or the k-th of all the
/// case's agents (whoever's they are).
#[derive(Debug, Clone, Copy)]
enum AgentRef {
    Own(usize),
    Any(usize),
}

/// Where an agent's `send` goes.
#[derive(Debug, Clone)]
enum To {
    /// No `to`: every session that can reach the agent.
    Broadcast,
    /// The k-th live session of the agent's user.
    OwnSession(usize),
    /// The k-th of all the sessions ever opened in this case (any user; possibly closed).
    AnySession(usize),
    /// A session id that never existed.
    Nobody,
}

/// Where a client's `send` goes.
#[derive(Debug, Clone)]
enum ClientTo {
    /// No `to` (the bound agent; `bad_frame` when the session is not bound).
    Omit,
    Agent(AgentRef),
    /// An agent id that does not exist.
    Nobody,
}

/// One step. Indices are taken modulo what exists when the step runs.
#[derive(Debug, Clone)]
enum Op {
    ConnectClient {
        user: usize,
        allow: Option<Vec<AgentRef>>,
        bind: Option<AgentRef>,
    },
    /// Index among the live sessions.
    DisconnectClient(usize),
    /// Any agent: revoked ones are refused, connected ones replaced.
    ConnectAgent(usize),
    /// Index among the connected agents.
    DisconnectAgent(usize),
    /// Any agent (revoking twice is allowed).
    Revoke(usize),
    /// `agent` indexes the connected agents.
    AgentSend {
        agent: usize,
        to: To,
    },
    /// `client` indexes the live sessions.
    ClientSend {
        client: usize,
        to: ClientTo,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    /// One entry per user: how many agents it has.
    agents_per_user: Vec<usize>,
    ops: Vec<Op>,
}

fn agent_ref() -> impl Strategy<Value = AgentRef> {
    prop_oneof![3 => (0usize..64).prop_map(AgentRef::Own), 1 => (0usize..64).prop_map(AgentRef::Any)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let idx = || 0usize..64;
    prop_oneof![
        4 => (
            idx(),
            proptest::option::weighted(0.3, proptest::collection::vec(agent_ref(), 0..3)),
            proptest::option::weighted(0.3, agent_ref()),
        )
            .prop_map(|(user, allow, bind)| Op::ConnectClient { user, allow, bind }),
        1 => idx().prop_map(Op::DisconnectClient),
        4 => idx().prop_map(Op::ConnectAgent),
        1 => idx().prop_map(Op::DisconnectAgent),
        1 => idx().prop_map(Op::Revoke),
        5 => (
            idx(),
            prop_oneof![
                3 => Just(To::Broadcast),
                4 => idx().prop_map(To::OwnSession),
                2 => idx().prop_map(To::AnySession),
                1 => Just(To::Nobody),
            ],
        )
            .prop_map(|(agent, to)| Op::AgentSend { agent, to }),
        5 => (
            idx(),
            prop_oneof![1 => Just(ClientTo::Omit), 6 => agent_ref().prop_map(ClientTo::Agent), 1 => Just(ClientTo::Nobody)],
        )
            .prop_map(|(client, to)| Op::ClientSend { client, to }),
    ]
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (proptest::collection::vec(1usize..=2, 2..=3), proptest::collection::vec(op_strategy(), 20..60))
        .prop_map(|(agents_per_user, ops)| Scenario { agents_per_user, ops })
}

struct AgentSlot {
    id: String,
    user: String,
    name: String,
    cred: AgentCredential,
    revoked: bool,
    conn: Option<AgentConn>,
}

struct ClientSlot {
    user: String,
    session: String,
    bound: Option<String>,
    allow: Option<Vec<String>>,
    conn: Option<ClientConn>,
}

impl ClientSlot {
    /// §3.3/§5: the binding and the token's allowlist (ownership is checked separately).
    fn can_reach(&self, agent_id: &str) -> bool {
        self.bound.as_deref().is_none_or(|b| b == agent_id)
            && self.allow.as_ref().is_none_or(|a| a.iter().any(|x| x == agent_id))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Agent(usize),
    Client(usize),
}

/// The daemon under test, the connections, and the model's state (which agents are revoked,
/// which connections are live).
struct World<'a> {
    d: &'a Daemon,
    users: Vec<String>,
    agents: Vec<AgentSlot>,
    clients: Vec<ClientSlot>,
    trace: Vec<String>,
    sends: u64,
}

/// `frame` has every field of `pattern` with the same value (extra fields are allowed: the
/// spec lets receivers ignore unknown fields).
fn matches(pattern: &Value, frame: &Value) -> bool {
    pattern.as_object().unwrap().iter().all(|(k, v)| frame.get(k) == Some(v))
}

fn read_frame(ws: &mut Ws, what: &str) -> Value {
    match ws.recv(WAIT) {
        Event::Frame(f) => f.value,
        other => panic!("{what}: expected a frame, got {other:?}"),
    }
}

/// After the close handshake, waits until the relay has dropped the socket (it does so
/// after removing the connection from its user's state), so the next step sees the model's
/// world.
fn wait_dropped(ws: &mut Ws, what: &str) {
    let mut s = ws.tcp();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: the relay did not drop the socket after the close handshake");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Reads up to the relay's close frame (no data frame may come first), answers it, and
/// waits for the socket to be dropped.
fn expect_closed_with(ws: &mut Ws, code: u16, what: &str) {
    match ws.recv(WAIT) {
        Event::Close { code: got, .. } => assert_eq!(got, code, "{what}: close code"),
        other => panic!("{what}: expected close {code}, got {other:?}"),
    }
    wait_dropped(ws, what);
}

/// Closes from our side (1000) and waits until the relay has let go.
fn close_ours(ws: &mut Ws, what: &str) {
    ws.close();
    match ws.recv(WAIT) {
        Event::Close { .. } | Event::Eof(_) => {}
        other => panic!("{what}: expected the close reply, got {other:?}"),
    }
    wait_dropped(ws, what);
}

impl World<'_> {
    fn log(&mut self, s: String) {
        self.trace.push(s);
    }

    /// Counts what the model predicted, over every case (printed at the end as coverage).
    fn count(&self, what: &str) {
        *STATS.lock().unwrap().entry(what.to_string()).or_insert(0) += 1;
    }

    /// The agent id `r` names for a step acting as `user`.
    fn resolve(&self, r: AgentRef, user: &str) -> String {
        match r {
            AgentRef::Own(k) => {
                let own: Vec<&AgentSlot> = self.agents.iter().filter(|a| a.user == user).collect();
                own[k % own.len()].id.clone()
            }
            AgentRef::Any(k) => self.agents[k % self.agents.len()].id.clone(),
        }
    }

    fn live_clients(&self) -> Vec<usize> {
        (0..self.clients.len()).filter(|&i| self.clients[i].conn.is_some()).collect()
    }

    fn connected_agents(&self) -> Vec<usize> {
        (0..self.agents.len()).filter(|&i| self.agents[i].conn.is_some()).collect()
    }

    fn ws(&mut self, who: Who) -> &mut Ws {
        match who {
            Who::Agent(i) => &mut self.agents[i].conn.as_mut().expect("connected agent").ws,
            Who::Client(i) => &mut self.clients[i].conn.as_mut().expect("live client").ws,
        }
    }

    fn name(&self, who: Who) -> String {
        match who {
            Who::Agent(i) => format!("agent#{i} {} (user {})", self.agents[i].id, self.agents[i].user),
            Who::Client(i) => {
                format!("client#{i} {} (user {})", self.clients[i].session, self.clients[i].user)
            }
        }
    }

    /// Live sessions of `user` that can reach agent `a`.
    fn sessions_reaching(&self, a: usize) -> Vec<usize> {
        let agent = &self.agents[a];
        self.live_clients()
            .into_iter()
            .filter(|&c| self.clients[c].user == agent.user && self.clients[c].can_reach(&agent.id))
            .collect()
    }

    /// Each expected frame arrives, in order per connection; then every live connection's
    /// next frame is the pong to a fresh ping (nothing unpredicted is pending anywhere).
    fn check(&mut self, expected: Vec<(Who, Value)>) {
        for (who, pattern) in &expected {
            let kind = match (who, pattern["type"].as_str().unwrap()) {
                (Who::Agent(_), "message") => "message to an agent".to_string(),
                (Who::Client(_), "message") => "message to a session".to_string(),
                (_, "error") => format!("error {}", pattern["code"].as_str().unwrap()),
                (Who::Agent(_), t) => format!("{t} to an agent"),
                (Who::Client(_), t) => format!("{t} to a session"),
            };
            self.count(&kind);
        }
        for (who, pattern) in expected {
            let what = format!("{} expecting {pattern}", self.name(who));
            let got = read_frame(self.ws(who), &what);
            assert!(matches(&pattern, &got), "{what}: got {got}");
        }
        let mut live: Vec<Who> = self.connected_agents().into_iter().map(Who::Agent).collect();
        live.extend(self.live_clients().into_iter().map(Who::Client));
        for &who in &live {
            self.ws(who).ping().expect("send ping");
        }
        for &who in &live {
            let what = format!("{} expecting only its pong", self.name(who));
            let got = read_frame(self.ws(who), &what);
            assert_eq!(got["type"], json!("pong"), "{what}: an unpredicted frame arrived: {got}");
        }
    }

    fn step(&mut self, op: &Op) {
        let n_agents = self.agents.len();
        match op {
            Op::ConnectClient { user, allow, bind } => {
                let user = self.users[user % self.users.len()].clone();
                let allow: Option<Vec<String>> =
                    allow.as_ref().map(|v| v.iter().map(|&r| self.resolve(r, &user)).collect());
                let bound = bind.map(|r| self.resolve(r, &user));
                let mut claims = json!({"sub": user, "exp": unix_now() + 3600});
                if let Some(a) = &allow {
                    claims["agents"] = json!(a);
                }
                let token = self.d.mint(&claims);
                let slot =
                    ClientSlot { user: user.clone(), session: String::new(), bound, allow, conn: None };
                self.log(format!(
                    "connect client of {user} bound={:?} allow={:?}",
                    slot.bound.as_deref(),
                    slot.allow
                ));
                let opts = ClientOpts { agent: slot.bound.clone(), ..ClientOpts::default() };
                let r = ClientConn::connect_with(self.d.addr, Some((TokenPlace::Header, &token)), &opts);
                // §3.3: binding to an agent that is not the user's (or revoked), or outside the
                // allowlist, is a 403, whether or not the agent exists.
                if let Some(b) = &slot.bound {
                    let owned = self.agents.iter().any(|a| a.id == *b && a.user == user && !a.revoked);
                    if !owned || !slot.can_reach(b) {
                        assert_refused(r, 403, "forbidden");
                        self.count("client upgrade refused 403");
                        self.log("  -> 403".into());
                        return self.check(vec![]);
                    }
                }
                let conn = r.unwrap_or_else(|e| panic!("client of {user} should connect: {e}"));
                let mut slot = slot;
                slot.session = conn.session.clone();
                assert_eq!(conn.welcome.str("user"), user, "welcome: {}", conn.welcome.text);
                // §4.3: every agent of the user this session can reach, online or not;
                // revoked ones are not listed.
                let want: BTreeSet<(String, String, bool)> = self
                    .agents
                    .iter()
                    .filter(|a| a.user == user && !a.revoked && slot.can_reach(&a.id))
                    .map(|a| (a.id.clone(), a.name.clone(), a.conn.is_some()))
                    .collect();
                let got: BTreeSet<(String, String, bool)> = conn.welcome.value["agents"]
                    .as_array()
                    .unwrap_or_else(|| panic!("welcome without agents: {}", conn.welcome.text))
                    .iter()
                    .map(|a| {
                        (
                            a["id"].as_str().unwrap().into(),
                            a["name"].as_str().unwrap().into(),
                            a["online"] == json!(true),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "client welcome agents: {}", conn.welcome.text);
                self.log(format!("  -> session {}", slot.session));
                let session = slot.session.clone();
                slot.conn = Some(conn);
                self.clients.push(slot);
                let c = self.clients.len() - 1;
                let expected = self
                    .connected_agents()
                    .into_iter()
                    .filter(|&a| self.agents[a].user == user && self.clients[c].can_reach(&self.agents[a].id))
                    .map(|a| (Who::Agent(a), json!({"type": "session", "session": session, "open": true})))
                    .collect();
                self.check(expected);
            }
            Op::DisconnectClient(k) => {
                let live = self.live_clients();
                if live.is_empty() {
                    return;
                }
                let c = live[k % live.len()];
                self.log(format!("disconnect {}", self.name(Who::Client(c))));
                let what = self.name(Who::Client(c));
                let mut conn = self.clients[c].conn.take().unwrap();
                close_ours(&mut conn.ws, &what);
                let session = self.clients[c].session.clone();
                let user = self.clients[c].user.clone();
                let expected = self
                    .connected_agents()
                    .into_iter()
                    .filter(|&a| self.agents[a].user == user && self.clients[c].can_reach(&self.agents[a].id))
                    .map(|a| (Who::Agent(a), json!({"type": "session", "session": session, "open": false})))
                    .collect();
                self.check(expected);
            }
            Op::ConnectAgent(k) => {
                let a = k % n_agents;
                self.log(format!("connect {}", self.name(Who::Agent(a))));
                let r = AgentConn::connect(self.d.addr, &self.agents[a].cred);
                if self.agents[a].revoked {
                    assert_refused(r, 401, "unauthorized");
                    self.count("agent upgrade refused 401");
                    self.log("  -> 401".into());
                    return self.check(vec![]);
                }
                let conn = r.unwrap_or_else(|e| panic!("{} should connect: {e}", self.name(Who::Agent(a))));
                let want: BTreeSet<String> =
                    self.sessions_reaching(a).into_iter().map(|c| self.clients[c].session.clone()).collect();
                let got: BTreeSet<String> = conn.welcome.value["sessions"]
                    .as_array()
                    .unwrap_or_else(|| panic!("welcome without sessions: {}", conn.welcome.text))
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(got, want, "agent welcome sessions: {}", conn.welcome.text);
                assert_eq!(
                    (conn.welcome.str("agent"), conn.welcome.str("user")),
                    (self.agents[a].id.as_str(), self.agents[a].user.as_str())
                );
                let mut expected = Vec::new();
                match self.agents[a].conn.replace(conn) {
                    // §5: the newer connection replaces the older, which is closed with 4009;
                    // the agent never went offline, so no presence.
                    Some(mut old) => {
                        let what = format!("replaced {}", self.name(Who::Agent(a)));
                        expect_closed_with(&mut old.ws, 4009, &what);
                        self.count("agent replaced 4009");
                        self.log("  -> replaced the older connection (4009)".into());
                    }
                    None => {
                        let id = self.agents[a].id.clone();
                        for c in self.sessions_reaching(a) {
                            expected.push((
                                Who::Client(c),
                                json!({"type": "presence", "agent": id, "online": true}),
                            ));
                        }
                    }
                }
                self.check(expected);
            }
            Op::DisconnectAgent(k) => {
                let connected = self.connected_agents();
                if connected.is_empty() {
                    return;
                }
                let a = connected[k % connected.len()];
                let what = self.name(Who::Agent(a));
                self.log(format!("disconnect {what}"));
                let mut conn = self.agents[a].conn.take().unwrap();
                close_ours(&mut conn.ws, &what);
                let id = self.agents[a].id.clone();
                let expected = self
                    .sessions_reaching(a)
                    .into_iter()
                    .map(|c| (Who::Client(c), json!({"type": "presence", "agent": id, "online": false})))
                    .collect();
                self.check(expected);
            }
            Op::Revoke(k) => {
                let a = k % n_agents;
                let what = self.name(Who::Agent(a));
                self.log(format!("revoke {what}"));
                self.d.revoke(&self.agents[a].id);
                self.agents[a].revoked = true;
                let mut expected = Vec::new();
                if let Some(mut conn) = self.agents[a].conn.take() {
                    // §7: a revoked agent's connection is closed with 4003; its sessions see
                    // it go offline.
                    expect_closed_with(&mut conn.ws, 4003, &what);
                    self.count("agent revoked 4003");
                    let id = self.agents[a].id.clone();
                    for c in self.sessions_reaching(a) {
                        expected.push((
                            Who::Client(c),
                            json!({"type": "presence", "agent": id, "online": false}),
                        ));
                    }
                }
                self.check(expected);
            }
            Op::AgentSend { agent, to } => {
                let connected = self.connected_agents();
                if connected.is_empty() {
                    return;
                }
                let a = connected[agent % connected.len()];
                self.sends += 1;
                let data = json!({"n": self.sends, "by": self.agents[a].id});
                let id = format!("m{}", self.sends);
                let agent_id = self.agents[a].id.clone();
                let user = self.agents[a].user.clone();
                let target: Option<(Option<usize>, String)> = match to {
                    To::Broadcast => None,
                    To::OwnSession(k) => {
                        let own: Vec<usize> = self
                            .live_clients()
                            .into_iter()
                            .filter(|&c| self.clients[c].user == user)
                            .collect();
                        match own.is_empty() {
                            true => Some((None, "ses_neverexisted00".into())),
                            false => {
                                let c = own[k % own.len()];
                                Some((Some(c), self.clients[c].session.clone()))
                            }
                        }
                    }
                    To::AnySession(_) if self.clients.is_empty() => Some((None, "ses_neverexisted00".into())),
                    To::AnySession(k) => {
                        let c = k % self.clients.len();
                        Some((Some(c), self.clients[c].session.clone()))
                    }
                    To::Nobody => Some((None, "ses_neverexisted00".into())),
                };
                self.log(format!(
                    "{} sends {data} to {}",
                    self.name(Who::Agent(a)),
                    target.as_ref().map_or("everyone".to_string(), |t| t.1.clone())
                ));
                let conn = self.agents[a].conn.as_mut().unwrap();
                conn.send(target.as_ref().map(|t| t.1.as_str()), &data, Some(&id)).expect("agent send");
                let message = json!({"type": "message", "from": agent_id, "data": data});
                let mut expected = Vec::new();
                let outcome: Result<Vec<usize>, &str> = match &target {
                    None => Ok(self.sessions_reaching(a)),
                    Some((Some(c), _))
                        if self.clients[*c].conn.is_some() && self.clients[*c].user == user =>
                    {
                        if self.clients[*c].can_reach(&agent_id) {
                            Ok(vec![*c])
                        } else {
                            Err("not_allowed")
                        }
                    }
                    // Closed, another user's, or never existed: all look the same.
                    Some(_) => Err("offline"),
                };
                match outcome {
                    Ok(to) => {
                        for c in to {
                            expected.push((Who::Client(c), message.clone()));
                        }
                        expected.push((Who::Agent(a), json!({"type": "ack", "id": id})));
                    }
                    Err(code) => {
                        expected.push((Who::Agent(a), json!({"type": "error", "code": code, "id": id})));
                    }
                }
                self.log(format!("  -> expect {expected:?}"));
                self.check(expected);
            }
            Op::ClientSend { client, to } => {
                let live = self.live_clients();
                if live.is_empty() {
                    return;
                }
                let c = live[client % live.len()];
                self.sends += 1;
                let data = json!({"n": self.sends, "by": self.clients[c].session});
                let id = format!("m{}", self.sends);
                let to_id: Option<String> = match to {
                    ClientTo::Omit => None,
                    ClientTo::Agent(r) => Some(self.resolve(*r, &self.clients[c].user)),
                    ClientTo::Nobody => Some("ag_doesnotexist0000".into()),
                };
                self.log(format!("{} sends {data} to {to_id:?}", self.name(Who::Client(c))));
                let session = self.clients[c].session.clone();
                let user = self.clients[c].user.clone();
                self.clients[c]
                    .conn
                    .as_mut()
                    .unwrap()
                    .send(to_id.as_deref(), &data, Some(&id))
                    .expect("client send");
                let target = to_id.or_else(|| self.clients[c].bound.clone());
                let err = |code: &str| (Who::Client(c), json!({"type": "error", "code": code, "id": id}));
                let expected = match target {
                    // §4.4: leaving `to` out is only for bound sessions.
                    None => vec![err("bad_frame")],
                    Some(t) => {
                        let agent = self.agents.iter().position(|a| a.id == t);
                        let mine = agent.filter(|&i| self.agents[i].user == user && !self.agents[i].revoked);
                        if !self.clients[c].can_reach(&t) {
                            vec![err("not_allowed")]
                        } else {
                            match mine {
                                Some(i) if self.agents[i].conn.is_some() => vec![
                                    (
                                        Who::Agent(i),
                                        json!({"type": "message", "from": session, "data": data}),
                                    ),
                                    (Who::Client(c), json!({"type": "ack", "id": id})),
                                ],
                                Some(_) => vec![err("offline")],
                                // Another user's, revoked, or no such agent.
                                None => vec![err("not_allowed")],
                            }
                        }
                    }
                };
                self.log(format!("  -> expect {expected:?}"));
                self.check(expected);
            }
        }
    }
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn run_case(s: &Scenario) -> Result<(), TestCaseError> {
    let mut d = Daemon::start(DaemonOpts {
        shards: 4,
        // The model is spec §5 routing: offline delivery (§8) is off here, so an offline agent
        // or a closed session is `offline`; §8's own isolation is checked by the resume and
        // mailbox suites.
        config_toml:
            "[presence]\noffline_grace_ms = 0\n[history]\nmax_messages = 0\n[mailbox]\nmax_messages = 0\n"
                .into(),
        ..DaemonOpts::default()
    });
    let users: Vec<String> = (0..s.agents_per_user.len()).map(|i| format!("user-{i}")).collect();
    let mut agents = Vec::new();
    for (u, &n) in s.agents_per_user.iter().enumerate() {
        for k in 0..n {
            let name = format!("agent-{u}-{k}");
            let cred = d.hmac_agent(&users[u], &name);
            agents.push(AgentSlot {
                id: cred.agent_id().to_string(),
                user: users[u].clone(),
                name,
                cred,
                revoked: false,
                conn: None,
            });
        }
    }
    let mut world = World { d: &d, users, agents, clients: Vec::new(), trace: Vec::new(), sends: 0 };
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        for op in &s.ops {
            world.step(op);
        }
    }));
    let failure = outcome.err().map(|e| {
        format!(
            "{}\nagents: {:?}\ntrace:\n  {}",
            panic_text(&*e),
            world.agents.iter().map(|a| format!("{} of {}", a.id, a.user)).collect::<Vec<_>>(),
            world.trace.join("\n  ")
        )
    });
    drop(world);
    // Whatever happened, the daemon must have survived the program.
    d.assert_alive();
    match failure {
        None => Ok(()),
        Some(f) => Err(TestCaseError::fail(f)),
    }
}

#[test]
fn random_programs_deliver_exactly_what_the_model_allows() {
    let seed: u64 = std::env::var("ISOLATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5b0a_2d1e);
    let cases: u32 = std::env::var("ISOLATION_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    eprintln!("isolation_property: seed {seed}, {cases} cases (ISOLATION_SEED / ISOLATION_CASES to change)");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        // Every shrink step starts a daemon: bounded, so a failure still ends in time.
        max_shrink_iters: 64,
        max_shrink_time: 60_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let started = Instant::now();
    let result = runner.run(&scenario_strategy(), |s| run_case(&s));
    match result {
        Ok(()) => eprintln!(
            "isolation_property: {cases} cases passed in {:?}; the model predicted {:?}",
            started.elapsed(),
            STATS.lock().unwrap()
        ),
        Err(TestError::Fail(reason, program)) => {
            panic!("seed {seed}: isolation broken.\n{reason}\nminimal program: {program:#?}")
        }
        Err(e) => panic!("seed {seed}: {e}"),
    }
}
