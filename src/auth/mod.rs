//! PLACEHOLDER from the wt-store branch so `cli` compiles; the real auth module replaces it.
pub mod jwt;
