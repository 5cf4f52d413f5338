//! Native TLS (`wss://`) with rustls on the ring provider, driven the same readiness way as
//! plain sockets: the shard `recv`s ciphertext into its scratch buffer, [`TlsIo::decrypt`]
//! turns it into plaintext for the WebSocket layer, and [`TlsIo::encrypt`] +
//! [`TlsIo::write_to`] send queued frames as TLS records with non-blocking `send`s.
//!
//! Invariants:
//! - TLS 1.2 is the minimum (rustls offers 1.2 and 1.3 only).
//! - A session's state moves with its socket to the home shard (`ServerConnection` is
//!   `Send`); certificates are reloaded on SIGHUP for new connections, existing sessions keep
//!   theirs.
//! - rustls never buffers more than one batch of frames: the connection moves frames from its
//!   budgeted queue into rustls only when rustls has written out everything before.

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

/// Loads a certificate chain and its private key (PEM) into a server configuration.
pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    use anyhow::Context;
    let certs = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("server.tls_cert_file {}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls_cert_file {}: bad PEM", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("server.tls_cert_file {}: no certificate", cert_file.display());
    }
    // The error never includes key material: only the file name.
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|_| anyhow::anyhow!("server.tls_key_file {}: no usable private key", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("server.tls_cert_file/tls_key_file do not make a usable pair: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// One connection's TLS session.
pub struct TlsIo {
    conn: ServerConnection,
}

/// Writes TLS records to a socket without blocking.
struct FdWriter(RawFd);

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: plain send of a borrowed buffer on a descriptor the caller owns.
        let n = unsafe {
            libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsIo {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsIo, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        // The connection bounds what it hands rustls (one batch at a time), so rustls's own
        // limit would only turn a full batch into a write error.
        conn.set_buffer_limit(None);
        Ok(TlsIo { conn })
    }

    /// Feeds ciphertext; appends the plaintext it yields to `out`. An error is fatal for the
    /// connection (an alert may be queued: call [`TlsIo::write_to`] before closing).
    pub fn decrypt(&mut self, mut cipher: &[u8], out: &mut BytesMut) -> Result<(), rustls::Error> {
        while !cipher.is_empty() {
            match self.conn.read_tls(&mut cipher) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Err(rustls::Error::General("TLS input buffer full".into())),
            }
            let state = self.conn.process_new_packets()?;
            let mut want = state.plaintext_bytes_to_read();
            while want > 0 {
                out.reserve(want);
                let spare = out.spare_capacity_mut();
                // SAFETY: the reader writes at most spare.len() initialised bytes into it;
                // set_len covers exactly what it wrote.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len()) };
                match self.conn.reader().read(buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        unsafe { out.set_len(out.len() + n) };
                        want = want.saturating_sub(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }

    /// Encrypts `plain` into rustls's outgoing records (sent by [`TlsIo::write_to`]).
    pub fn encrypt(&mut self, plain: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(plain)
    }

    /// True while TLS records wait to be sent.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Sends pending TLS records. Ok(true): all sent; Ok(false): the socket is full.
    pub fn write_to(&mut self, fd: RawFd) -> io::Result<bool> {
        let mut w = FdWriter(fd);
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut w) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}
