//! `vmplant bench`: benchmarks that print JSON lines and a summary line,
//! side by side with the anchors in ../shared/anchors.

mod agent;
mod blk;
mod boot;
mod guests;
mod gvfs;
mod measure;
mod migrate;
mod snapshot;
mod virtio_fs;
mod vnet;

use super::CliResult;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot the test guest N times in vmplant, Firecracker and Cloud
    /// Hypervisor in turn: time to the first ready line, and RSS.
    Boot(boot::BootBenchArgs),
    /// Ping and iperf3 between two namespaces through a Linux bridge, one
    /// VNET switch, and two joined by UDP and TLS tunnels; control times;
    /// TCP, ping and frames per second between two test guests.
    Vnet(vnet::VnetBenchArgs),
    /// Sequential and random reads, stat and readdir through the local
    /// file system, a GVFS mount (TCP and TLS) and sshfs, over loopback.
    Gvfs(gvfs::GvfsBenchArgs),
    /// The test guest reads and writes a file through virtio-fs served
    /// in-process by GVFS and by virtiofsd over vhost-user.
    VirtioFs(virtio_fs::VirtioFsBenchArgs),
    /// Snapshot a guest that wrote memory, restore it in a fresh process,
    /// start many clones of one snapshot: vmplant and Firecracker side by
    /// side (time, disk use, RSS, PSS per clone, host memory).
    Snapshot(snapshot::SnapshotBenchArgs),
    /// Move a running test guest to another process over loopback TCP
    /// (idle, after filling 200 MiB, while rewriting memory): vmplant and
    /// QEMU side by side, then what Cloud Hypervisor does.
    Migrate(migrate::MigrateBenchArgs),
    /// The agent: API latency, POST /vms to the guest's first line (and
    /// Firecracker's API path to it), clones started through the API.
    Agent(agent::AgentBenchArgs),
    /// The test guest's 4 KiB random and 1 MiB sequential reads of a raw
    /// image through virtio-blk in vmplant and Firecracker, and fio on the
    /// host as the ceiling; the chunks a first read of 100 scattered
    /// sectors fetches from an image store on a GVFS server.
    Blk(blk::BlkBenchArgs),
}

pub fn run(cmd: BenchCommand) -> CliResult {
    match cmd {
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Vnet(args) => vnet::run(args),
        BenchCommand::Gvfs(args) => gvfs::run(args),
        BenchCommand::VirtioFs(args) => virtio_fs::run(args),
        BenchCommand::Snapshot(args) => snapshot::run(args),
        BenchCommand::Migrate(args) => migrate::run(args),
        BenchCommand::Agent(args) => agent::run(args),
        BenchCommand::Blk(args) => blk::run(args),
    }
}
