//! `sslmode` for the PostgreSQL sink, as libpq users expect it.
//!
//! tokio-postgres understands `sslmode` `disable`, `prefer` and `require` only, and verifies
//! nothing itself; TLS comes from `tokio-postgres-rustls` over rustls (ring, as on our ports).
//! This module reads libpq's `sslmode` and `sslrootcert` from the connection string (either
//! form: `key=value …` or a `postgres://` URL), hands tokio-postgres the rest, and builds the
//! certificate check libpq would make:
//!
//! | `sslmode` | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | when the server offers it | not checked |
//! | `require` | always | not checked; checked as `verify-ca` when `sslrootcert` is set |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert` and names the host connected to |
//!
//! `sslrootcert` is a PEM file of CA certificates; libpq's default `~/.postgresql/root.crt` is
//! used when it is not given. (`allow` tries TLS first rather than last.)

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// A connection string taken apart: what tokio-postgres connects with, and how TLS is checked.
pub struct PgConnect {
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl PgConnect {
    /// Reads `conn` (libpq `key=value` pairs or a `postgres://` URL).
    pub fn parse(conn: &str) -> Result<Self, String> {
        let (rest, mode, rootcert) = take_ssl_options(conn)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| format!("connection string: {e}"))?;
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let check = match (mode, &rootcert) {
            (SslMode::VerifyFull, _) => Check::Full,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Ca,
            _ => Check::None,
        };
        let tls = client_config(check, rootcert)?;
        Ok(Self { config, mode, tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls) })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Ca,
    Full,
}

fn client_config(check: Check, rootcert: Option<PathBuf>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if check == Check::None {
        Arc::new(Unchecked)
    } else {
        let path = match rootcert {
            Some(p) => p,
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
                .ok_or("sslmode verify-ca/verify-full needs sslrootcert (and HOME is not set)")?,
        };
        let pem = std::fs::read(&path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("sslrootcert {}: no certificate in it", path.display()));
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        if check == Check::Full { webpki } else { Arc::new(AnyName(webpki)) }
    };
    Ok(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())
}

/// Splits `sslmode` and `sslrootcert` off a connection string; returns the rest (in the same
/// form), the mode (libpq's default `prefer`) and the root certificate file.
fn take_ssl_options(conn: &str) -> Result<(String, SslMode, Option<PathBuf>), String> {
    let mut mode = SslMode::Prefer;
    let mut rootcert = None;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => mode = value.parse()?,
            "sslrootcert" if value == "system" => {
                return Err("sslrootcert=system is not supported: name a PEM file of CA certificates".into());
            }
            "sslrootcert" => rootcert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let (base, query) = conn.split_once('?').unwrap_or((conn, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            if !take(k, &value)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        return Ok((rest, mode, rootcert));
    }
    let mut kept = String::new();
    for (key, raw, value) in key_values(conn)? {
        if !take(key, &value)? {
            kept.push_str(key);
            kept.push('=');
            kept.push_str(raw);
            kept.push(' ');
        }
    }
    Ok((kept.trim_end().to_owned(), mode, rootcert))
}

/// libpq's `key = value` pairs: (key, the value as written, the value unescaped). Values may
/// be single-quoted; `\'` and `\\` (and, unquoted, `\ `) escape. Errors name a byte offset,
/// never the text: it may hold a password.
fn key_values(s: &str) -> Result<Vec<(&str, &str, String)>, String> {
    let mut out = Vec::new();
    let mut at = s.len() - s.trim_start().len();
    while at < s.len() {
        let rest = &s[at..];
        let eq = rest.find('=').ok_or_else(|| format!("connection string: no \"=\" after byte {at}"))?;
        let key = rest[..eq].trim_end();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("connection string: a bad key at byte {at}"));
        }
        let start = at + eq + 1 + (rest[eq + 1..].len() - rest[eq + 1..].trim_start().len());
        let mut value = String::new();
        let mut chars = s[start..].char_indices();
        let quoted = s[start..].starts_with('\'');
        if quoted {
            chars.next();
        }
        let end = loop {
            match chars.next() {
                None if quoted => return Err(format!("connection string: unterminated quoted value at byte {start}")),
                None => break s.len() - start,
                Some((i, '\'')) if quoted => break i + 1,
                Some((i, c)) if !quoted && c.is_whitespace() => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("connection string: a dangling \\ at byte {start}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((key, &s[start..start + end], value));
        at = start + end;
        at += s[at..].len() - s[at..].trim_start().len();
    }
    Ok(out)
}

/// The handshake-signature methods both verifiers need: rustls' own checks with the ring
/// provider's algorithms (signatures are checked even when the certificate is not).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &ring().signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &ring().signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            ring().signature_verification_algorithms.supported_schemes()
        }
    };
}

fn ring() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// `require`/`prefer` without a root certificate: encrypted, the server not authenticated
/// (libpq's behaviour; the handshake's signatures are still checked).
#[derive(Debug)]
struct Unchecked;

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    handshake_signatures!();
}

/// `verify-ca`: the chain must lead to a root of ours; the name in the certificate is not
/// compared with the host (rustls checks the name last, after the chain, so only a chain that
/// verified can fail on its name).
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_options_come_off_both_forms() {
        let (rest, mode, root) =
            take_ssl_options("host=db user='a b' sslmode=verify-full sslrootcert='/etc/ca.pem' dbname=x").unwrap();
        assert_eq!(rest, "host=db user='a b' dbname=x");
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));

        let (rest, mode, root) =
            take_ssl_options("postgres://u:p@db:5432/x?sslmode=verify-ca&application_name=c&sslrootcert=%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=c");
        assert_eq!(mode, SslMode::VerifyCa);
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));

        let (rest, mode, root) = take_ssl_options("postgres://db/x").unwrap();
        assert_eq!((rest.as_str(), mode, root), ("postgres://db/x", SslMode::Prefer, None));
        let (rest, mode, _) = take_ssl_options("host = db  password='it\\'s' sslmode = disable").unwrap();
        assert_eq!((rest.as_str(), mode), ("host=db password='it\\'s'", SslMode::Disable));
    }

    #[test]
    fn bad_options_are_named() {
        assert!(take_ssl_options("host=db sslmode=verify").unwrap_err().contains("verify-full"));
        assert!(take_ssl_options("host=db sslrootcert=system").unwrap_err().contains("system"));
        let e = take_ssl_options("host=db password='open").unwrap_err();
        assert!(e.contains("unterminated") && !e.contains("open"), "{e}");
        assert!(!take_ssl_options("host=db secret-word").unwrap_err().contains("secret"));
        // Unquoted values may escape a space, as libpq allows.
        let (rest, _, _) = take_ssl_options("host=db password=a\\ b sslmode=require").unwrap();
        assert_eq!(rest, "host=db password=a\\ b");
        assert!(
            PgConnect::parse("host=db sslmode=verify-full sslrootcert=/nonexistent/ca.pem")
                .err()
                .unwrap()
                .contains("/nonexistent/ca.pem")
        );
    }

    #[test]
    fn modes_map_onto_tokio_postgres() {
        for (conn, want) in [
            ("host=db sslmode=disable", tokio_postgres::config::SslMode::Disable),
            ("host=db", tokio_postgres::config::SslMode::Prefer),
            ("host=db sslmode=require", tokio_postgres::config::SslMode::Require),
        ] {
            assert_eq!(PgConnect::parse(conn).unwrap().config.get_ssl_mode(), want, "{conn}");
        }
    }
}
