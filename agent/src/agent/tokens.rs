//! Tenants: the tokens file maps each bearer token to a tenant, a role
//! and a quota.
//!
//! `{"tokens":[{"token":"...","tenant":"a","role":"admin|tenant|reader",
//! "quota":{"vms":N,"vcpus":N,"mem_mib":N}}]}`; the quota and each of its
//! limits are optional (no limit).

use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the tokens file {path:?}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {path:?} is not valid: {source}")]
    Parse {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("the tokens file has an empty token (tenant {0:?})")]
    Empty(String),
    #[error("the tokens file has a token twice (tenant {0:?})")]
    Duplicate(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Sees and changes every tenant's VMs.
    Admin,
    /// Sees and changes its tenant's VMs, within its quota.
    Tenant,
    /// Sees its tenant's VMs, changes nothing.
    Reader,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub vms: Option<u32>,
    pub vcpus: Option<u64>,
    pub mem_mib: Option<u64>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub role: Role,
    pub quota: Quota,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether the caller may see VMs of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant == tenant
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    token: String,
    tenant: String,
    role: Role,
    #[serde(default)]
    quota: Quota,
}

/// The tokens, looked up by value.
#[derive(Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Caller>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_owned(),
            source,
        })?;
        Tokens::parse(&text).map_err(|e| match e {
            TokensError::Parse { source, .. } => TokensError::Parse {
                path: path.to_owned(),
                source,
            },
            e => e,
        })
    }

    pub fn parse(text: &str) -> Result<Tokens, TokensError> {
        let file: File = serde_json::from_str(text).map_err(|source| TokensError::Parse {
            path: Default::default(),
            source,
        })?;
        let mut by_token = HashMap::new();
        for e in file.tokens {
            let caller = Caller {
                tenant: e.tenant,
                role: e.role,
                quota: e.quota,
            };
            if e.token.is_empty() {
                return Err(TokensError::Empty(caller.tenant));
            }
            if by_token.contains_key(&e.token) {
                return Err(TokensError::Duplicate(caller.tenant));
            }
            by_token.insert(e.token, caller);
        }
        Ok(Tokens { by_token })
    }

    /// The caller an `Authorization` header value names, if any.
    pub fn check(&self, header: Option<&str>) -> Option<&Caller> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        // Compare in constant time per candidate so that a wrong token's
        // timing does not tell how much of it was right.
        self.by_token
            .iter()
            .find(|(t, _)| constant_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, c)| c)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_callers() {
        let t = Tokens::parse(
            r#"{"tokens":[{"token":"s1","tenant":"a","role":"tenant","quota":{"vms":2}},
                          {"token":"s2","tenant":"ops","role":"admin"}]}"#,
        )
        .unwrap();
        let a = t.check(Some("Bearer s1")).unwrap();
        assert_eq!(a.tenant, "a");
        assert_eq!(a.quota.vms, Some(2));
        assert!(t.check(Some("Bearer s2")).unwrap().is_admin());
        assert!(t.check(Some("Bearer s3")).is_none());
        assert!(t.check(Some("s1")).is_none());
        assert!(t.check(None).is_none());
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(
            Tokens::parse(r#"{"tokens":[{"token":"","tenant":"a","role":"tenant"}]}"#).is_err()
        );
        assert!(Tokens::parse(r#"{"tokens":[{"token":"x","tenant":"a","role":"boss"}]}"#).is_err());
        assert!(
            Tokens::parse(
                r#"{"tokens":[{"token":"x","tenant":"a","role":"tenant"},{"token":"x","tenant":"b","role":"tenant"}]}"#
            )
            .is_err()
        );
    }
}
