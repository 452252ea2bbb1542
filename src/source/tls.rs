//! TLS to Postgres, configured as libpq users write it: `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey` in the source URL. The same settings serve the query connections
//! (tokio-postgres over rustls) and the replication connection (pgwire-replication's rustls).
//!
//! | `sslmode`      | TLS                    | chain checked | host name checked |
//! |----------------|------------------------|---------------|-------------------|
//! | `disable`      | never                  | –             | –                 |
//! | `prefer` (default) | if the server offers it | no       | no                |
//! | `require`      | always                 | no (yes when `sslrootcert` is given, as libpq) | no |
//! | `verify-ca`    | always                 | yes           | no                |
//! | `verify-full`  | always                 | yes           | yes               |
//!
//! `sslrootcert` is a PEM file of trusted CAs, or `system` for the operating system's
//! store; without it a verifying mode reads libpq's default `~/.postgresql/root.crt`.

use super::SourceError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use std::path::PathBuf;
use std::sync::Arc;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plain first; without a TLS-only server it is `prefer`.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trust store.
    System,
}

/// The TLS part of a source URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCerts>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl TlsSettings {
    /// Takes the TLS parameters out of a `postgres://` URL (or a `key=value` connection
    /// string), returning the rest for tokio-postgres, which knows only `sslmode` up to
    /// `require`.
    pub fn split(url: &str) -> Result<(String, TlsSettings), SourceError> {
        let mut settings = TlsSettings::default();
        let mut set = |key: &str, value: &str| -> Result<(), SourceError> {
            match key {
                "sslmode" => {
                    settings.mode = SslMode::parse(value).ok_or_else(|| {
                        SourceError::Url(format!(
                            "sslmode `{value}` is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        ))
                    })?
                }
                "sslrootcert" => {
                    settings.root_cert = Some(if value == "system" {
                        RootCerts::System
                    } else {
                        RootCerts::File(PathBuf::from(value))
                    })
                }
                "sslcert" => settings.client_cert = Some(PathBuf::from(value)),
                "sslkey" => settings.client_key = Some(PathBuf::from(value)),
                _ => unreachable!("only KEYS are passed"),
            }
            Ok(())
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (base, query) = url.split_once('?').unwrap_or((url, ""));
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if KEYS.contains(&k) {
                    let v = percent_decode(v)
                        .ok_or_else(|| SourceError::Url(format!("{k}: bad %-escape in `{v}`")))?;
                    set(k, &v)?;
                } else {
                    kept.push(pair);
                }
            }
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        } else {
            // key=value form; values with spaces (quoted) are left to tokio-postgres.
            let mut kept = Vec::new();
            for word in url.split_whitespace() {
                match word.split_once('=') {
                    Some((k, v)) if KEYS.contains(&k) => set(k, v.trim_matches('\''))?,
                    _ => kept.push(word),
                }
            }
            kept.join(" ")
        };
        settings.validate()?;
        Ok((rest, settings))
    }

    fn validate(&self) -> Result<(), SourceError> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(SourceError::Url(
                "sslcert and sslkey go together: give both or neither".into(),
            ));
        }
        Ok(())
    }

    /// The mode in effect: libpq treats `require` with a root certificate as `verify-ca`.
    pub fn effective_mode(&self) -> SslMode {
        match (self.mode, &self.root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (mode, _) => mode,
        }
    }

    /// The parameters as they go back into a libpq URL (for `psql`/`pg_restore`); none
    /// when they are all libpq's defaults.
    pub fn url_params(&self) -> Vec<(&'static str, String)> {
        if *self == TlsSettings::default() {
            return Vec::new();
        }
        let mut p = vec![("sslmode", self.mode.as_str().to_string())];
        match &self.root_cert {
            Some(RootCerts::File(f)) => p.push(("sslrootcert", f.display().to_string())),
            Some(RootCerts::System) => p.push(("sslrootcert", "system".into())),
            None => {}
        }
        if let (Some(c), Some(k)) = (&self.client_cert, &self.client_key) {
            p.push(("sslcert", c.display().to_string()));
            p.push(("sslkey", k.display().to_string()));
        }
        p
    }

    /// tokio-postgres's own mode: it negotiates, our verifier decides what is trusted.
    pub(crate) fn postgres_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as M;
        match self.effective_mode() {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            _ => M::Require,
        }
    }

    fn root_store(&self) -> Result<Option<RootCertStore>, String> {
        let source = match (&self.root_cert, self.effective_mode()) {
            (Some(r), _) => r.clone(),
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                let default = home_root_cert();
                match default {
                    Some(p) if p.exists() => RootCerts::File(p),
                    _ => {
                        return Err(format!(
                            "sslmode={} needs trusted CA certificates: set sslrootcert=<file> \
                             (or sslrootcert=system); libpq's default ~/.postgresql/root.crt \
                             does not exist",
                            self.mode.as_str()
                        ))
                    }
                }
            }
            (None, _) => return Ok(None),
        };
        let mut store = RootCertStore::empty();
        match source {
            RootCerts::File(path) => {
                let certs = read_certs(&path, "sslrootcert")?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert {}: no usable CA certificate in it",
                        path.display()
                    ));
                }
            }
            RootCerts::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err("sslrootcert=system: the system trust store is empty".into());
                }
            }
        }
        Ok(Some(store))
    }

    /// The rustls configuration for the query connections; `None` when TLS is off.
    pub(crate) fn client_config(&self) -> Result<Option<ClientConfig>, String> {
        let mode = self.effective_mode();
        if mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let roots = self.root_store()?;
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            (SslMode::VerifyCa | SslMode::VerifyFull, Some(roots)) => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| e.to_string())?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            _ => Arc::new(AcceptAny(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }

    /// The same settings for the replication client.
    pub(crate) fn replication(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as M;
        let mode = match self.effective_mode() {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            SslMode::Require => M::Require,
            SslMode::VerifyCa => M::VerifyCa,
            SslMode::VerifyFull => M::VerifyFull,
        };
        let ca_pem_path = match &self.root_cert {
            Some(RootCerts::File(p)) => Some(p.clone()),
            // pgwire-replication falls back to the Mozilla roots, the closest it has.
            Some(RootCerts::System) => None,
            None => home_root_cert().filter(|p| p.exists()),
        };
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path,
            sni_hostname: None,
            client_cert_pem_path: self.client_cert.clone(),
            client_key_pem_path: self.client_key.clone(),
        }
    }
}

fn home_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
}

fn read_certs(path: &PathBuf, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `require`/`prefer`: encryption without authentication of the server, as libpq. The
/// handshake signatures are still checked, so the session key is the certificate's.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
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

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in it is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_libpq_tls_parameters_out_of_urls_and_keyword_strings() {
        let (rest, tls) = TlsSettings::split(
            "postgres://u:p@db:5432/crm?application_name=x&sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/crm?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert,
            Some(RootCerts::File("/ca dir/ca.pem".into()))
        );

        let (rest, tls) =
            TlsSettings::split("host=db dbname=crm sslmode=require sslrootcert=system").unwrap();
        assert_eq!(rest, "host=db dbname=crm");
        assert_eq!(tls.root_cert, Some(RootCerts::System));
        assert_eq!(tls.effective_mode(), SslMode::VerifyCa, "libpq's rule");

        let (rest, tls) = TlsSettings::split("postgres://db/crm").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://db/crm", SslMode::Prefer)
        );
    }

    #[test]
    fn bad_tls_parameters_are_named() {
        let e = TlsSettings::split("postgres://db/crm?sslmode=verify").unwrap_err();
        assert!(e.to_string().contains("sslmode `verify`"), "{e}");
        let e = TlsSettings::split("postgres://db/crm?sslcert=/c.pem").unwrap_err();
        assert!(e.to_string().contains("sslcert and sslkey"), "{e}");
        let tls = TlsSettings::split("postgres://db/crm?sslmode=verify-full&sslrootcert=/nope.pem")
            .unwrap()
            .1;
        let e = tls.client_config().unwrap_err();
        assert!(e.contains("sslrootcert /nope.pem"), "{e}");
    }
}
