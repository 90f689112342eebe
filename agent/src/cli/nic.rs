//! `--net` values (and the `nets` of a `--config` file): a NIC's MAC
//! address and, optionally, `any-source`.

use std::fmt;
use std::str::FromStr;
use vnet::{Mac, SourcePolicy};

/// A guest NIC: `MAC`, or `MAC,any-source` for a guest that may send from
/// other addresses than its own (one that bridges or routes for other
/// hosts at layer 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nic {
    pub mac: Mac,
    /// The guest may send from any unicast address, not only `mac`.
    pub any_source: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NicError {
    #[error(
        "{0:?} is not a MAC address (six hex bytes joined by colons or dashes, like 52:54:00:12:34:56 or 52-54-00-12-34-56)"
    )]
    Mac(String),
    #[error("unknown NIC option {0:?} (the one known is any-source)")]
    Option(String),
}

impl FromStr for Nic {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let mac = parts.next().unwrap_or_default();
        let mut nic = Nic {
            mac: mac.parse().map_err(|_| NicError::Mac(mac.into()))?,
            any_source: false,
        };
        for o in parts {
            match o {
                "any-source" => nic.any_source = true,
                _ => return Err(NicError::Option(o.into())),
            }
        }
        Ok(nic)
    }
}

/// The MAC address: what the guest sees of the NIC.
impl fmt::Display for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.mac.fmt(f)
    }
}

/// A NIC that sends from its own address only.
impl From<Mac> for Nic {
    fn from(mac: Mac) -> Nic {
        Nic {
            mac,
            any_source: false,
        }
    }
}

impl Nic {
    /// The NIC as `--net` takes it: `MAC` or `MAC,any-source`.
    pub fn spec(&self) -> String {
        if self.any_source {
            format!("{},any-source", self.mac)
        } else {
            self.mac.to_string()
        }
    }

    /// The source addresses its switch port lets through.
    pub fn source(&self) -> SourcePolicy {
        if self.any_source {
            SourcePolicy::Any
        } else {
            SourcePolicy::Only(self.mac)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::run::RunArgs;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    #[test]
    fn net_takes_a_mac_and_optionally_any_source() {
        let parse = |net: &str| Run::try_parse_from(["run", "--kernel", "k", "--net", net]);
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        let nets = parse("52:54:00:12:34:56").unwrap().args.nets;
        assert_eq!(nets[0].source(), SourcePolicy::Only(mac));
        let nets = parse("52:54:00:12:34:56,any-source").unwrap().args.nets;
        assert_eq!(nets[0].source(), SourcePolicy::Any);
        assert_eq!(nets[0].to_string(), "52:54:00:12:34:56");
        assert!(parse("52:54:00:12:34:56,whatever").is_err());
        assert_eq!(
            "52:54:00:12:34:56,any".parse::<Nic>(),
            Err(NicError::Option("any".into()))
        );
        assert_eq!(
            "nope,any-source".parse::<Nic>(),
            Err(NicError::Mac("nope".into()))
        );
    }
}
