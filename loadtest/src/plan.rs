//! Who connects: users, each with agents and clients, flattened into one list of connections
//! indexed by a `usize` that also travels in every message (`"s"` sender, `"r"` recipient).

use crate::auth::AgentKey;

/// An agent's credential (the `--agents-file` format, and what `agent create --json` prints):
/// an HMAC agent has a `secret`; an Ed25519 agent has an `ed25519_seed` instead (its 32-byte
/// private seed, base64url or hex; the daemon holds the public key).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct AgentCred {
    pub agent_id: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ed25519_seed: Option<String>,
}

impl AgentCred {
    /// The signing key this credential names.
    pub fn key(&self) -> anyhow::Result<AgentKey> {
        match (&self.secret, &self.ed25519_seed) {
            (_, Some(seed)) => AgentKey::ed25519_from_text(seed)
                .map_err(|e| anyhow::anyhow!("agent {}: ed25519_seed: {e}", self.agent_id)),
            (Some(secret), None) => Ok(AgentKey::Hmac(secret.clone())),
            (None, None) => anyhow::bail!("agent {} has neither a secret nor an ed25519_seed", self.agent_id),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Role {
    Agent { agent_id: String, key: AgentKey },
    Client { token: String },
}

#[derive(Debug, Clone)]
pub struct ConnPlan {
    pub user: usize,
    pub role: Role,
}

impl ConnPlan {
    pub fn is_agent(&self) -> bool {
        matches!(self.role, Role::Agent { .. })
    }
}

#[derive(Debug, Clone)]
pub struct UserPlan {
    /// Indices into [`Plan::conns`].
    pub agents: Vec<usize>,
    pub clients: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub users: Vec<UserPlan>,
    pub conns: Vec<ConnPlan>,
}

impl Plan {
    /// `agents[u]` are user `u`'s agent credentials, `tokens[u]` its client JWT; every user
    /// gets `clients_per_user` client connections with that token.
    pub fn build(
        names: &[String],
        agents: &[Vec<AgentCred>],
        tokens: &[Option<String>],
        clients_per_user: usize,
    ) -> anyhow::Result<Plan> {
        let mut users = Vec::with_capacity(names.len());
        let mut conns = Vec::new();
        for u in 0..names.len() {
            let mut up = UserPlan { agents: Vec::new(), clients: Vec::new() };
            for a in &agents[u] {
                up.agents.push(conns.len());
                conns.push(ConnPlan {
                    user: u,
                    role: Role::Agent { agent_id: a.agent_id.clone(), key: a.key()? },
                });
            }
            if clients_per_user > 0 {
                let token = tokens[u].clone().expect("a token for every user with clients");
                for _ in 0..clients_per_user {
                    up.clients.push(conns.len());
                    conns.push(ConnPlan { user: u, role: Role::Client { token: token.clone() } });
                }
            }
            users.push(up);
        }
        Ok(Plan { users, conns })
    }

    pub fn agents(&self) -> usize {
        self.conns.iter().filter(|c| c.is_agent()).count()
    }

    pub fn clients(&self) -> usize {
        self.conns.len() - self.agents()
    }
}
