//! Guest file shares.
//!
//! - `--fs TAG=HOST:PORT,token-file=FILE,(tls-ca=FILE|plaintext)[,cache-dir=DIR]`
//!   gives the guest a virtio-fs device it mounts with
//!   `mount -t virtiofs TAG DIR`, served in this process by a GVFS client
//!   of the server at HOST:PORT.
//! - `--vhost-user-fs TAG=SOCKET` gives it one served by an external
//!   vhost-user backend (virtiofsd) listening on SOCKET.

use super::chain;
use devices::virtio::fs::FuseServer;
use gvfs::client::{ConnectConfig, Fs, FsOptions};
use gvfs::fuse_proto::FuseHandler;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A `--fs` share; kept as it is (paths made absolute) in a snapshot's
/// device plan, so that a restore connects the share again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub tag: String,
    pub server: String,
    pub token_file: PathBuf,
    pub tls_ca: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("{0:?}: want TAG=HOST:PORT,token-file=FILE,(tls-ca=FILE|plaintext)[,cache-dir=DIR]")]
    Syntax(String),
    #[error("{0:?}: unknown option {1:?}")]
    Unknown(String, String),
    #[error("{0:?}: give tls-ca=FILE or plaintext, and not both")]
    Transport(String),
    #[error("{0:?}: the server {1:?} is not HOST:PORT (e.g. 127.0.0.1:7070)")]
    Server(String, String),
    #[error("{0:?}: token-file is missing")]
    NoToken(String),
    #[error("{0:?}: want TAG=SOCKET")]
    VhostUserSyntax(String),
}

impl FromStr for Share {
    type Err = ShareError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let (tag, server) = parts
            .next()
            .and_then(|p| p.split_once('='))
            .filter(|(t, a)| !t.is_empty() && !a.is_empty())
            .ok_or_else(|| ShareError::Syntax(s.into()))?;
        let (mut token_file, mut tls_ca, mut cache_dir, mut plaintext) = (None, None, None, false);
        for p in parts {
            match p.split_once('=') {
                Some(("token-file", v)) => token_file = Some(PathBuf::from(v)),
                Some(("tls-ca", v)) => tls_ca = Some(PathBuf::from(v)),
                Some(("cache-dir", v)) => cache_dir = Some(PathBuf::from(v)),
                None if p == "plaintext" => plaintext = true,
                _ => return Err(ShareError::Unknown(s.into(), p.into())),
            }
        }
        if plaintext == tls_ca.is_some() {
            return Err(ShareError::Transport(s.into()));
        }
        if !gvfs::client::conn::has_port(server) {
            return Err(ShareError::Server(s.into(), server.into()));
        }
        Ok(Share {
            tag: tag.into(),
            server: server.into(),
            token_file: token_file.ok_or_else(|| ShareError::NoToken(s.into()))?,
            tls_ca,
            cache_dir,
        })
    }
}

impl Share {
    /// The share with its files named by absolute paths (those of the
    /// working directory it was given in), for a restore elsewhere.
    pub fn absolute(&self) -> Share {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        Share {
            token_file: abs(&self.token_file),
            tls_ca: self.tls_ca.as_ref().map(abs),
            cache_dir: self.cache_dir.as_ref().map(abs),
            ..self.clone()
        }
    }

    /// Connects a GVFS client to the share's server and authenticates,
    /// so that a dead server or a wrong token fails here, before the guest
    /// starts, as `vmplant gvfs mount` does.
    pub fn connect(&self) -> Result<Arc<dyn FuseServer>, Box<dyn std::error::Error + Send + Sync>> {
        let named = |e: &dyn std::error::Error| format!("share {}: {}", self.tag, chain(e));
        let tls = match &self.tls_ca {
            Some(ca) => Some(gvfs::transport::client_tls_config(ca).map_err(|e| named(&e))?),
            None => None,
        };
        let cfg = ConnectConfig {
            addr: self.server.clone(),
            token: super::gvfs::read_token(&self.token_file)
                .map_err(|e| format!("share {}: {e}", self.tag))?,
            tls,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        };
        let opts = FsOptions {
            cache_dir: self.cache_dir.clone(),
            ..Default::default()
        };
        let fs = Fs::new(cfg, opts).map_err(|e| named(&e))?;
        fs.set_label(&self.tag);
        fs.connect().map_err(|e| named(&e))?;
        Ok(Arc::new(FuseHandler::new(Arc::new(fs))))
    }
}

/// A virtio-fs share served by a vhost-user backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserShare {
    pub tag: String,
    pub socket: PathBuf,
}

impl FromStr for VhostUserShare {
    type Err = ShareError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((tag, socket)) if !tag.is_empty() && !socket.is_empty() => Ok(VhostUserShare {
                tag: tag.into(),
                socket: socket.into(),
            }),
            _ => Err(ShareError::VhostUserSyntax(s.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms() {
        let s: Share = "data=127.0.0.1:7000,token-file=/t,plaintext"
            .parse()
            .unwrap();
        assert_eq!(
            (s.tag.as_str(), s.server.as_str(), s.tls_ca),
            ("data", "127.0.0.1:7000", None)
        );
        let s: Share = "home=h:1,token-file=/t,tls-ca=/ca.pem,cache-dir=/c"
            .parse()
            .unwrap();
        assert_eq!(s.tls_ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.cache_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn vhost_user_shares_name_a_tag_and_a_socket() {
        let v: VhostUserShare = "data=/run/vfsd.sock".parse().unwrap();
        assert_eq!(v.tag, "data");
        assert_eq!(v.socket, PathBuf::from("/run/vfsd.sock"));
        for bad in ["data", "=/s", "data="] {
            assert_eq!(
                bad.parse::<VhostUserShare>(),
                Err(ShareError::VhostUserSyntax(bad.into()))
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let err = |s: &str| s.parse::<Share>().unwrap_err();
        assert!(matches!(err("data"), ShareError::Syntax(_)));
        assert!(matches!(
            err("=h:1,token-file=/t,plaintext"),
            ShareError::Syntax(_)
        ));
        assert!(matches!(err("d=h:1,plaintext"), ShareError::NoToken(_)));
        assert!(matches!(
            err("d=localhost,token-file=/t,plaintext"),
            ShareError::Server(..)
        ));
        assert!(matches!(
            err("d=h:1,token-file=/t"),
            ShareError::Transport(_)
        ));
        assert!(matches!(
            err("d=h:1,token-file=/t,plaintext,tls-ca=/x"),
            ShareError::Transport(_)
        ));
        assert!(matches!(
            err("d=h:1,token-file=/t,plaintext,colour=blue"),
            ShareError::Unknown(..)
        ));
    }
}
