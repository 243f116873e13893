//! Certificates by SNI: the edge's TLS listener asks [`Resolver`] for each handshake, which
//! reads the current [`Certs`] (swapped whole on a change, like the route table). A name no
//! binding covers, or a client without SNI, gets the default certificate (self-signed, made at
//! start, as ingress-nginx's "fake certificate").

use crate::host::HostIndex;
use crate::ingress::TlsBinding;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;

/// A certificate chain and key from PEM (a `kubernetes.io/tls` Secret's `tls.crt`, `tls.key`).
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt: no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// A self-signed certificate for `name`.
pub fn self_signed(name: &str) -> Arc<CertifiedKey> {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()])
        .expect("a self-signed certificate");
    certified_key(
        c.cert.pem().as_bytes(),
        c.key_pair.serialize_pem().as_bytes(),
    )
    .expect("rcgen's own PEM")
}

/// The certificates of the bindings, by host.
pub struct Certs {
    by_host: HostIndex<Option<Arc<CertifiedKey>>>,
    default: Arc<CertifiedKey>,
}

impl Certs {
    /// Binds each binding's hosts to its Secret's certificate, as `secret` finds it (the first
    /// binding of a host wins); a binding whose Secret is missing or bad is reported naming it.
    pub fn build(
        bindings: &[TlsBinding],
        secret: impl Fn(&str, &str) -> Option<(Vec<u8>, Vec<u8>)>,
        default: Arc<CertifiedKey>,
    ) -> (Certs, Vec<String>) {
        let mut by_host: HostIndex<Option<Arc<CertifiedKey>>> = HostIndex::default();
        let mut problems = Vec::new();
        for b in bindings {
            let key = match secret(&b.namespace, &b.secret) {
                None => {
                    problems.push(format!(
                        "{}: Secret {}/{} does not exist or is not of type kubernetes.io/tls",
                        b.origin, b.namespace, b.secret
                    ));
                    continue;
                }
                Some((crt, key)) => match certified_key(&crt, &key) {
                    Ok(k) => k,
                    Err(e) => {
                        problems.push(format!(
                            "{}: Secret {}/{}: {e}",
                            b.origin, b.namespace, b.secret
                        ));
                        continue;
                    }
                },
            };
            for h in &b.hosts {
                by_host.entry(h).get_or_insert_with(|| key.clone());
            }
        }
        (Certs { by_host, default }, problems)
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        sni.and_then(|n| self.by_host.lookup(&n.to_ascii_lowercase()))
            .and_then(|k| k.clone())
            .unwrap_or_else(|| self.default.clone())
    }
}

/// rustls's hook: the current certificates, read per handshake.
#[derive(Debug)]
pub struct Resolver(pub Arc<ArcSwap<Certs>>);

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certs")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()))
    }
}

/// A server configuration answering HTTP/2 and HTTP/1.1 (ALPN) with `resolver`'s certificates.
pub fn server_config(resolver: Arc<Resolver>) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostPattern, Star};

    #[test]
    fn sni_picks_the_binding_then_the_default() {
        let shop = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
        let wild = rcgen::generate_simple_self_signed(vec!["*.example.org".into()]).unwrap();
        let pems = [
            ("shop-tls", shop.cert.pem(), shop.key_pair.serialize_pem()),
            ("wild-tls", wild.cert.pem(), wild.key_pair.serialize_pem()),
            ("bad-tls", "not a cert".into(), "no".into()),
        ];
        let binding = |host: &str, secret: &str| TlsBinding {
            hosts: vec![HostPattern::parse(host, Star::OneLabel)],
            namespace: "shop".into(),
            secret: secret.into(),
            origin: format!("Ingress shop/x ({host})"),
        };
        let (certs, problems) = Certs::build(
            &[
                binding("shop.example.com", "shop-tls"),
                binding("*.example.org", "wild-tls"),
                binding("bad.example.com", "bad-tls"),
                binding("gone.example.com", "gone-tls"),
            ],
            |ns, name| {
                (ns == "shop")
                    .then(|| pems.iter().find(|(n, ..)| *n == name))
                    .flatten()
                    .map(|(_, c, k)| (c.clone().into_bytes(), k.clone().into_bytes()))
            },
            self_signed("default.invalid"),
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("shop/bad-tls: tls.crt"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("shop/gone-tls does not exist"),
            "{problems:?}"
        );
        let der = |k: Arc<CertifiedKey>| k.cert[0].to_vec();
        assert_eq!(
            der(certs.pick(Some("SHOP.example.com"))),
            shop.cert.der().to_vec()
        );
        assert_eq!(
            der(certs.pick(Some("a.example.org"))),
            wild.cert.der().to_vec()
        );
        let default = der(certs.default.clone());
        assert_eq!(
            der(certs.pick(Some("a.b.example.org"))),
            default,
            "one label"
        );
        assert_eq!(der(certs.pick(Some("bad.example.com"))), default);
        assert_eq!(der(certs.pick(None)), default);
    }
}
