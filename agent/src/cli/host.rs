//! `vmplant host`: what this host's KVM can do, as one JSON object.

use super::CliResult;
use std::process::ExitCode;

pub fn run() -> CliResult {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let info = vmm::host::info(&kvm);
    println!("{}", serde_json::to_string(&info)?);
    if let Some(w) = info.warning() {
        eprintln!("vmplant: {w}");
    }
    Ok(ExitCode::SUCCESS)
}
