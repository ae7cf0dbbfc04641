//! Throwaway certificates for a TLS test server: a private CA and a server certificate it
//! signed, valid for `127.0.0.1` and `localhost`, made with the `openssl` command.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, find_binary, io_error, run};

/// The files a TLS server and its clients need, all in the server's temp dir.
#[derive(Debug, Clone)]
pub(crate) struct Certificates {
    /// The CA clients trust (PEM).
    pub(crate) ca: PathBuf,
    /// The server's certificate (PEM), signed by the CA.
    pub(crate) cert: PathBuf,
    /// The server's private key (PEM).
    pub(crate) key: PathBuf,
}

impl Certificates {
    /// Makes a fresh CA and server certificate in `dir`. P-256 keys: quick to generate and
    /// accepted by every TLS stack the tests use.
    pub(crate) fn generate(dir: &Path) -> Result<Self> {
        let openssl = find_binary("openssl", &[]).ok_or(Error::MissingBinary {
            binary: "openssl",
            package: "openssl",
            searched: "",
        })?;
        let path = |name: &str| dir.join(name);
        let (ca, ca_key) = (path("ca.crt"), path("ca.key"));
        let (cert, key, request) = (path("server.crt"), path("server.key"), path("server.csr"));
        let extensions = path("server.ext");
        std::fs::write(
            &extensions,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
        )
        .map_err(io_error("writing the server certificate's extensions"))?;

        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(
            Command::new(&openssl)
                .args(["req", "-x509", "-days", "2", "-subj", "/CN=brisk test CA"])
                .args(new_key)
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca),
            "openssl req (test CA)",
        )?;
        run(
            Command::new(&openssl)
                .args(["req", "-subj", "/CN=localhost"])
                .args(new_key)
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&request),
            "openssl req (server key)",
        )?;
        run(
            Command::new(&openssl)
                .args(["x509", "-req", "-days", "2", "-set_serial", "1"])
                .arg("-in")
                .arg(&request)
                .arg("-CA")
                .arg(&ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&extensions)
                .arg("-out")
                .arg(&cert),
            "openssl x509 (server certificate)",
        )?;
        Ok(Self { ca, cert, key })
    }
}
