//! The wire protocol's frames (protocol §4): the inbound envelope parser and every outbound
//! frame builder. Pure: no I/O, no clock, no logging, no panics on any input.
//!
//! - [`envelope`]: one inbound text frame → [`Inbound`] borrowing from the frame's bytes, or a
//!   [`FrameError`] (`bad_frame`) that echoes the frame's `id` when it had one.
//! - [`frames`]: relay → peer frames as complete WebSocket frames in [`bytes::Bytes`].
//!
//! Invariants the rest of the relay relies on:
//! - `data` is never re-serialized: the bytes a sender put between the `data` value's first
//!   and last character are what the recipient receives and what §3.2 signatures cover.
//! - `id` is echoed byte-exact in `ack` and `error`.
//! - One buffer allocation per outbound frame, built once; fan-out shares it by refcount
//!   (`Bytes::clone`), never copies it per recipient.
//! - Credentials (`token`, `sig`) never appear in `Debug` output.

pub mod envelope;
pub mod frames;

pub use envelope::{parse_inbound, Ctr, FrameError, Inbound, Kind};
