//! The nftables transaction writer: a whole script goes to one `nft -f -`, which the kernel applies
//! as a single atomic transaction — either every change lands or none does. One process per sync,
//! never one per rule. [`netlink`] speaks nf_tables natively for appliers that send many small
//! changes to large tables, where `nft` would read the whole table back first.

pub mod netlink;

use std::io::Write;
use std::process::{Command, Stdio};

pub const NFT: &str = "nft";

/// The packet mark bit the service proxy sets on a connection's first packet to have it
/// masqueraded at postrouting; every other flatnet table that writes the mark gives it back.
pub const MASQUERADE_MARK: u32 = 0x4000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftError(pub String);

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NftError {}

/// Applies `script` in the calling thread's network namespace.
pub fn apply(script: &str) -> Result<(), NftError> {
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NftError(format!("running {NFT} (install the nftables package): {e}")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| NftError(format!("writing to {NFT}: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| NftError(format!("waiting for {NFT}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError(format!(
            "{NFT} rejected the ruleset: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether the `nft` program can be run at all.
pub fn available() -> bool {
    Command::new(NFT)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Quotes a string for use as an nftables identifier or comment.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\\'], "_"))
}

/// The ruleset of one table (`family name`, e.g. `ip flatnet-routing`), or `None` if it does not
/// exist, in the calling thread's network namespace.
pub fn list_table(table: &str) -> Result<Option<String>, NftError> {
    let mut args = vec!["list", "table"];
    args.extend(table.split_whitespace());
    let out = Command::new(NFT)
        .args(&args)
        .output()
        .map_err(|e| NftError(format!("running {NFT} (install the nftables package): {e}")))?;
    if out.status.success() {
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
        Ok(None)
    } else {
        Err(NftError(format!(
            "{NFT} list table {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
