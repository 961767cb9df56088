//! `coalescectl certs`: a CA, one certificate per node and bearer tokens, as files ready for
//! `[tls.peer]`, `[tls.client]` and `[[auth.tokens]]` (or for Kubernetes Secrets:
//! docs/security.md). For a cluster without cert-manager, and for the compose cluster.
//!
//! Each node's certificate names the node (its name, then `<name>.<domain>` for every
//! `--domain`) and may serve and dial TLS (extended key usage serverAuth and clientAuth), as
//! `coalesce_raft::tls` requires of a peer. An existing `ca.pem`/`ca.key` in the output
//! directory is reused, so adding a node later issues its certificate from the same CA.
//! Libraries: rcgen (key generation and signing), time.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use coalesce_cli::outln;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Generate a CA, node certificates and tokens.
#[derive(Debug, clap::Args)]
pub(crate) struct CertsArgs {
    /// Directory to write into (created; existing node files are replaced, an existing CA reused).
    #[arg(long)]
    out: PathBuf,
    /// Node names, comma-separated (e.g. coalesce-0,coalesce-1,coalesce-2).
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// DNS suffixes under which nodes are also reached, comma-separated: `<node>.<domain>` is
    /// added to each node's certificate (e.g. coalesce-peers,coalesce-peers.coalesce.svc.cluster.local).
    #[arg(long, value_delimiter = ',')]
    domain: Vec<String>,
    /// More names for every node's certificate (e.g. a client Service name, localhost, 127.0.0.1).
    #[arg(long, value_delimiter = ',')]
    extra_name: Vec<String>,
    /// Bearer tokens to generate, as name:role+role (e.g. ingest:producer,ops:admin+consumer);
    /// written to tokens/<name>.token with a config snippet in tokens/auth.toml.
    #[arg(long, value_delimiter = ',')]
    token: Vec<String>,
    /// Validity of node certificates, in days (the CA's is ten times as long).
    #[arg(long, default_value_t = 365)]
    days: u32,
}

fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that lag the issuer's.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Writes the files; prints what it wrote.
pub(crate) fn run(args: &CertsArgs) -> anyhow::Result<()> {
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    for n in &args.nodes {
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            bail!("node name {n:?}: nodes are checked against certificates by name, so names must be DNS names");
        }
    }
    let out = &args.out;
    for dir in [out.clone(), out.join("nodes")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (ca_pem_path, ca_key_path) = (out.join("ca.pem"), out.join("ca.key"));
    let issuer = if ca_pem_path.exists() && ca_key_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path)?).context("reading ca.key")?;
        let pem = std::fs::read_to_string(&ca_pem_path)?;
        outln!("reusing the CA in {}", ca_pem_path.display());
        Issuer::from_ca_cert_pem(&pem, key).context("reading ca.pem")?
    } else {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "Coalesce CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, args.days.saturating_mul(10));
        let cert = params.self_signed(&key)?;
        write(&ca_pem_path, &cert.pem(), false)?;
        write(&ca_key_path, &key.serialize_pem(), true)?;
        outln!(
            "wrote {} and {} (keep the key offline: it issues node certificates)",
            ca_pem_path.display(),
            ca_key_path.display()
        );
        Issuer::new(params, key)
    };
    for node in &args.nodes {
        let mut names = vec![node.clone()];
        names.extend(args.domain.iter().map(|d| format!("{node}.{}", d.trim_start_matches('.'))));
        names.extend(args.extra_name.iter().cloned());
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(DnType::CommonName, node.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, args.days);
        let cert = params.signed_by(&key, &issuer)?;
        let (pem, key_path) =
            (out.join("nodes").join(format!("{node}.pem")), out.join("nodes").join(format!("{node}.key")));
        write(&pem, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        outln!("wrote {} ({})", pem.display(), names.join(", "));
    }
    if !args.token.is_empty() {
        let dir = out.join("tokens");
        std::fs::create_dir_all(&dir)?;
        let mut snippet = String::from(
            "# For the node config. token_file is relative to the config file: these paths assume the\n\
             # config sits in the directory given to --out.\n\n",
        );
        for spec in &args.token {
            let (name, roles) =
                spec.split_once(':').with_context(|| format!("--token {spec:?}: use name:role+role"))?;
            let roles: Vec<&str> = roles.split('+').collect();
            if let Some(bad) = roles.iter().find(|r| !["producer", "consumer", "admin"].contains(r)) {
                bail!("--token {spec:?}: role {bad:?} is not one of producer, consumer, admin");
            }
            let token: String = {
                use rand::RngExt;
                let mut rng = rand::rng();
                (0..32).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])).collect()
            };
            write(&dir.join(format!("{name}.token")), &token, true)?;
            let roles = roles.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(", ");
            snippet.push_str(&format!(
                "[[auth.tokens]]\nname = {name:?}\ntoken_file = \"tokens/{name}.token\"\nroles = [{roles}]\n\n"
            ));
        }
        write(&dir.join("auth.toml"), &snippet, false)?;
        outln!("wrote {} token(s) and {}", args.token.len(), dir.join("auth.toml").display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(out: &Path) -> CertsArgs {
        CertsArgs {
            out: out.to_owned(),
            nodes: vec!["coalesce-0".into(), "coalesce-1".into()],
            domain: vec!["coalesce-peers".into()],
            extra_name: vec!["localhost".into()],
            token: vec!["ingest:producer".into(), "ops:admin+consumer".into()],
            days: 30,
        }
    }

    #[test]
    fn writes_a_ca_node_certificates_and_tokens_and_reuses_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        run(&args(dir.path())).unwrap();
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        let node = std::fs::read_to_string(dir.path().join("nodes/coalesce-1.pem")).unwrap();
        assert!(node.starts_with("-----BEGIN CERTIFICATE-----"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(node.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san.value.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["DNSName(coalesce-1)", "DNSName(coalesce-1.coalesce-peers)", "DNSName(localhost)"]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth, "a node certificate serves and dials");
        let auth: toml::Value =
            toml::from_str(&std::fs::read_to_string(dir.path().join("tokens/auth.toml")).unwrap()).unwrap();
        assert_eq!(auth["auth"]["tokens"].as_array().unwrap().len(), 2);
        let token = std::fs::read_to_string(dir.path().join("tokens/ops.token")).unwrap();
        assert_eq!(token.len(), 32);
        // Again: the same CA, new node certificates.
        run(&args(dir.path())).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(), ca);
        assert_ne!(std::fs::read_to_string(dir.path().join("nodes/coalesce-1.pem")).unwrap(), node);
        let mut bad = args(dir.path());
        bad.token = vec!["x:root".into()];
        assert!(run(&bad).unwrap_err().to_string().contains("not one of producer"));
    }
}
