//! `cargo run --release -p gvfs --example bench -- [FILE_MIB] [FILES] [--no-sshfs]`
//! Prints JSON lines and a summary line; see `gvfs::bench`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = gvfs::bench::BenchConfig::default();
    let nums: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if let Some(m) = nums.first() {
        cfg.file_mib = *m;
    }
    if let Some(n) = nums.get(1) {
        cfg.files = *n as usize;
    }
    cfg.sshfs = !args.iter().any(|a| a == "--no-sshfs");
    if let Err(e) = gvfs::bench::run(&cfg, &mut std::io::stdout()) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}
