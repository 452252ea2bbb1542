//! TLS to Postgres as libpq users configure it (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey` in the source URL), against a private server with `ssl = on` and certificates
//! made here with `openssl`. The server refuses connections without TLS, so a pipeline
//! that streams at all used TLS on its query and its replication connections.

use crate::faults::run_once;
use crate::source_faults::PrivatePostgres;
use crate::support::*;
use pipeline::source::{connect, ConnInfo};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA, a server certificate it signed for `localhost`, a client certificate for the
/// role `certuser`, and a second CA the server's certificate is not from.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make(dir: &Path) -> Certs {
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(dir)
                .output()
                .expect("openssl (Debian package openssl)");
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca = |name: &str| {
            format!(
                "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name} \
                 -keyout {name}.key -out {name}.pem"
            )
        };
        sh(&ca("ca"));
        sh(&ca("other-ca"));
        let leaf = |name: &str, cn: &str, ext: &str| {
            format!(
                "openssl req -newkey rsa:2048 -nodes -subj /CN={cn} -keyout {name}.key -out {name}.csr\n\
                 printf '{ext}' > {name}.ext\n\
                 openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -days 2 -extfile {name}.ext -out {name}.pem"
            )
        };
        sh(&leaf(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost\\nextendedKeyUsage=serverAuth\\n",
        ));
        sh(&leaf(
            "client",
            "certuser",
            "extendedKeyUsage=clientAuth\\n",
        ));
        sh("chmod 600 server.key client.key");
        if unsafe { libc::geteuid() } == 0 {
            // The server runs as `postgres` and wants its key to be its own.
            sh("chown postgres:postgres . server.key server.pem ca.pem");
        }
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

const HBA: &str = "local all all trust\n\
                   hostssl all certuser 127.0.0.1/32 cert\n\
                   hostssl all all 127.0.0.1/32 trust\n\
                   host all all 127.0.0.1/32 reject\n";

/// The first error line of a failed connection, for the assertions.
async fn connect_error(url: &str) -> String {
    let info = ConnInfo::parse(url).unwrap();
    match connect(&info, 3).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => {
            eprintln!("{url}: {e}");
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_verify_the_server_and_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(tmp.path());
    let pg = PrivatePostgres::start(
        &[],
        &[
            "ssl = on",
            &format!("ssl_cert_file = '{}'", certs.path("server.pem")),
            &format!("ssl_key_file = '{}'", certs.path("server.key")),
            &format!("ssl_ca_file = '{}'", certs.path("ca.pem")),
        ],
    );
    pg.set_hba(HBA);
    let port = pg.port();
    let ca = certs.path("ca.pem");
    let full = format!("postgres://postgres@localhost:{port}?sslmode=verify-full&sslrootcert={ca}");

    // verify-full by name: the whole pipeline, query and replication connections, over TLS
    // (the server rejects anything else), and the features right.
    let (info, client) = seeded_db_at(&full, "pt_tls", 300).await;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    let p = pipeline_file(&info, "tls", Some(AS_OF));
    run_once(&p, "--once over verify-full");
    let want = oracle(&client, AS_OF).await;
    let got = latest_features(&p.lake).await;
    assert_eq!(got.len(), 300);
    let d = diff(&got, &want, 10);
    assert!(d.is_empty(), "{}", d.join("\n"));

    // A client certificate: `certuser` may log in only with one (hba `cert`), and the
    // pipeline's connections present it, replication included.
    client
        .batch_execute("CREATE ROLE certuser LOGIN SUPERUSER")
        .await
        .unwrap();
    let with_cert = format!(
        "postgres://certuser@localhost:{port}/pt_tls?sslmode=verify-full&sslrootcert={ca}\
         &sslcert={}&sslkey={}",
        certs.path("client.pem"),
        certs.path("client.key")
    );
    let info = ConnInfo::parse(&with_cert).unwrap();
    let c = connect(&info, 1).await.unwrap();
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "certuser");
    let mut p2 = pipeline_file(&info, "tls_cert", Some(AS_OF));
    p2.update(|c| c.source.url = with_cert.clone());
    run_once(&p2, "--once with a client certificate");
    assert_eq!(latest_features(&p2.lake).await.len(), 300);
    let e = connect_error(&format!(
        "postgres://certuser@localhost:{port}/pt_tls?sslmode=verify-full&sslrootcert={ca}"
    ))
    .await;
    assert!(e.contains("certificate"), "{e}");

    // verify-ca checks the chain only, so the address works; verify-full does not.
    let info = ConnInfo::parse(&format!(
        "postgres://postgres@127.0.0.1:{port}/pt_tls?sslmode=verify-ca&sslrootcert={ca}"
    ))
    .unwrap();
    connect(&info, 1).await.unwrap();
    let e = connect_error(&format!(
        "postgres://postgres@127.0.0.1:{port}/pt_tls?sslmode=verify-full&sslrootcert={ca}"
    ))
    .await;
    assert!(e.contains("TLS to Postgres at 127.0.0.1"), "{e}");
    assert!(e.contains("not valid for name"), "{e}");

    // A CA the server's certificate is not from.
    let other = certs.path("other-ca.pem");
    let e = connect_error(&format!(
        "postgres://postgres@localhost:{port}/pt_tls?sslmode=verify-full&sslrootcert={other}"
    ))
    .await;
    assert!(e.contains("UnknownIssuer"), "{e}");

    // The pipeline stops at once on a TLS failure (no retries), naming it, exit 1.
    let mut bad = pipeline_file(&info, "tls_bad", Some(AS_OF));
    bad.update(|c| {
        c.source.url = format!(
            "postgres://postgres@localhost:{port}/pt_tls?sslmode=verify-full&sslrootcert={other}"
        )
    });
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "--once"])
        .arg(&bad.file)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("UnknownIssuer") && err.contains("sslrootcert"),
        "{err}"
    );
    assert!(!err.contains("retrying"), "{err}");

    // Without TLS the server says no (hba), and `require` against a server without TLS
    // fails before any password or query is sent.
    let e = connect_error(&format!(
        "postgres://postgres@localhost:{port}/pt_tls?sslmode=disable"
    ))
    .await;
    assert!(
        e.contains("no encryption") || e.contains("pg_hba.conf"),
        "{e}"
    );
    let plain = PrivatePostgres::start(&[], &[]);
    let e = connect_error(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        plain.port()
    ))
    .await;
    assert!(e.contains("does not support TLS"), "{e}");
    // `prefer` (libpq's default) falls back to plain there.
    let info = ConnInfo::parse(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        plain.port()
    ))
    .unwrap();
    connect(&info, 1).await.unwrap();
}
