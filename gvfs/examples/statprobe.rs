//! Times a readdir and a stat pass over a served directory through a GVFS
//! mount, and shows which ops reached the server.
//! `statprobe EXPORT_DIR SUBDIR MOUNTPOINT`

use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (export, sub, mnt) = (&a[0], &a[1], &a[2]);
    let cfg = gvfs::server::ServerConfig {
        export: export.into(),
        token: b"t".to_vec(),
        read_only: true,
        tls: None,
        uid_map: Default::default(),
        gid_map: Default::default(),
        workers: 4,
        max_nodes: gvfs::server::DEFAULT_MAX_NODES,
    };
    let server = gvfs::server::Server::bind(cfg, "127.0.0.1:0".parse().unwrap())
        .unwrap()
        .spawn();
    let fs = gvfs::client::Fs::new(
        gvfs::client::ConnectConfig {
            addr: server.local_addr().to_string(),
            token: b"t".to_vec(),
            tls: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
        },
        gvfs::client::FsOptions {
            attr_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .unwrap();
    let fs2 = gvfs::client::Fs::new(
        gvfs::client::ConnectConfig {
            addr: server.local_addr().to_string(),
            token: b"t".to_vec(),
            tls: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
        },
        Default::default(),
    )
    .unwrap();
    let d = fs2.lookup(1, sub.as_bytes()).unwrap();
    let t = Instant::now();
    let n = fs2.readdir(d.ino).unwrap().len();
    println!("core readdir of {n}: {:?}", t.elapsed());
    let s = gvfs::fuse::mount(Arc::new(fs), std::path::Path::new(mnt), true).unwrap();
    let dir = std::path::Path::new(mnt).join(sub);
    let t = Instant::now();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let t_list = t.elapsed();
    let t = Instant::now();
    for p in &names {
        std::fs::symlink_metadata(p).unwrap();
    }
    let t_stat = t.elapsed();
    println!(
        "{} entries: list {:?}, stat {:?}",
        names.len(),
        t_list,
        t_stat
    );
    for c in server.stats() {
        if c.count > 0 {
            println!(
                "  {} x{} ({} bytes)",
                gvfs::proto::op::name(c.op),
                c.count,
                c.bytes
            );
        }
    }
    if let Some(file) = a.get(3) {
        let f = std::path::Path::new(mnt).join(file);
        for i in 0..3 {
            let t = Instant::now();
            let n =
                std::io::copy(&mut std::fs::File::open(&f).unwrap(), &mut std::io::sink()).unwrap();
            println!(
                "in-process read {i}: {:.0} MiB/s",
                n as f64 / 1048576.0 / t.elapsed().as_secs_f64()
            );
            let out = std::process::Command::new("dd")
                .arg(format!("if={}", f.display()))
                .args(["of=/dev/null", "bs=1M"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            println!("dd read {i}: {}", err.lines().last().unwrap_or(""));
        }
    }
    s.umount_and_join().unwrap();
}
