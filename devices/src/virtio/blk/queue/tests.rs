//! Request chains as a driver (or a hostile guest) puts them on the
//! queue, served against a raw file.

use super::*;
use crate::virtio::blk::RawFile;
use crate::virtio::test_utils::add_chain;
use virtio_queue::QueueOwnedT;
use virtio_queue::mock::MockSplitQueue;

const MEM: u64 = 0x10_0000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x1_0000;
const STATUS: u64 = 0x9000;
/// Sectors of the test disk.
const SECTORS: u64 = 64;

struct Rig {
    mem: GuestMemoryMmap,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    disk: RawFile,
    counters: BlkCounters,
}

impl Rig {
    fn new(read_only: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        let disk = RawFile::open(&path, read_only).unwrap();
        Rig {
            mem,
            _dir: dir,
            path,
            disk,
            counters: BlkCounters::default(),
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Serves the one chain `descs` with the header `kind`, `sector`:
    /// the status byte at STATUS and the used length.
    fn serve(&self, kind: u32, sector: u64, descs: &[(u64, u32, bool)]) -> (u8, u32) {
        self.header(kind, sector);
        let mq = MockSplitQueue::new(&self.mem, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        add_chain(&mq, 0, descs);
        let mut scratch = Scratch::default();
        let log = Throttle::default();
        let drained = process(
            &self.mem,
            &mut q,
            &self.disk,
            &self.counters,
            &mut scratch,
            &log,
        )
        .unwrap();
        assert!(drained.used, "the chain goes back");
        let used = mq.used().ring().ref_at(0).unwrap().load();
        let status = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (status, used.len())
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    fn c(&self) -> crate::virtio::blk::BlkCounterSnapshot {
        self.counters.snapshot()
    }
}

fn pattern(sector: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((sector * SECTOR_SIZE + i) % 251) as u8)
        .collect()
}

#[test]
fn reads_and_writes_reach_the_file_through_split_descriptors() {
    let r = Rig::new(false);
    // A read of sectors 3..5 into two buffers of 512 bytes.
    let (st, len) = r.serve(
        req::IN,
        3,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!((st, len), (status::OK, 1025));
    let mut got = vec![0u8; 1024];
    r.mem
        .read_slice(&mut got[..512], GuestAddress(DATA))
        .unwrap();
    r.mem
        .read_slice(&mut got[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, pattern(3, 1024));

    // A write of 1024 bytes to sector 10, the header split in two and
    // the status in the data's last writable descriptor.
    r.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    let before = r.file();
    r.header(req::OUT, 10);
    let (st, len) = r.serve(
        req::OUT,
        10,
        &[
            (HDR, 8, false),
            (HDR + 8, 8, false),
            (DATA, 1024, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!((st, len), (status::OK, 1));
    let after = r.file();
    assert!(after[5120..6144].iter().all(|&b| b == 0x5a));
    assert_eq!(after[..5120], before[..5120]);
    assert_eq!(after[6144..], before[6144..]);
    let c = r.c();
    assert_eq!((c.read_ops, c.read_bytes), (1, 1024));
    assert_eq!((c.write_ops, c.write_bytes), (1, 1024));
    assert_eq!(c.malformed, 0);
}

#[test]
fn flush_get_id_discard_and_write_zeroes_work() {
    let r = Rig::new(false);
    assert_eq!(
        r.serve(req::FLUSH, 0, &[(HDR, 16, false), (STATUS, 1, true)]),
        (status::OK, 1)
    );
    let (st, len) = r.serve(
        req::GET_ID,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    assert_eq!((st, len), (status::OK, 21));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let id = String::from_utf8_lossy(&id);
    assert_eq!(id.trim_end_matches('\0'), r.disk.id());

    // write-zeroes of sectors 4..6, then a discard of 8..9 (a hint).
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        r.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
    };
    seg(4, 2, 0);
    let chain = [(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)];
    assert_eq!(r.serve(req::WRITE_ZEROES, 0, &chain), (status::OK, 1));
    let f = r.file();
    assert!(f[2048..3072].iter().all(|&b| b == 0));
    assert_eq!(f[..2048], pattern(0, 2048)[..]);
    assert_eq!(f[3072..3584], pattern(6, 512)[..]);
    seg(8, 1, 0);
    assert_eq!(r.serve(req::DISCARD, 0, &chain), (status::OK, 1));
    // Discard with unmap, or any unknown flag: not supported.
    seg(8, 1, 1);
    assert_eq!(r.serve(req::DISCARD, 0, &chain), (status::UNSUPP, 1));
    seg(8, 1, 4);
    assert_eq!(r.serve(req::WRITE_ZEROES, 0, &chain), (status::UNSUPP, 1));
    // Past the end.
    seg(SECTORS - 1, 2, 0);
    assert_eq!(r.serve(req::WRITE_ZEROES, 0, &chain), (status::IOERR, 1));
    let c = r.c();
    assert_eq!((c.flushes, c.write_zeroes, c.discards), (1, 1, 1));
    assert_eq!((c.unsupported, c.out_of_range), (2, 1));
}

#[test]
fn each_malformed_chain_gets_an_error_status_and_is_counted() {
    let r = Rig::new(false);
    let before = r.file();
    let ok_read = |sector| {
        r.serve(
            req::IN,
            sector,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        )
    };
    // The last sector reads; one past it does not, nor a read that
    // starts inside and runs past the end, nor a sector that overflows.
    assert_eq!(ok_read(SECTORS - 1), (status::OK, 513));
    assert_eq!(ok_read(SECTORS), (status::IOERR, 1));
    assert_eq!(
        r.serve(
            req::IN,
            SECTORS - 1,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(ok_read(u64::MAX), (status::IOERR, 1));
    assert_eq!(r.c().out_of_range, 3);

    // A data length that is not whole sectors.
    assert_eq!(
        r.serve(
            req::IN,
            0,
            &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(
        r.serve(
            req::OUT,
            0,
            &[(HDR, 16, false), (DATA, 513, false), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    // A header too short.
    assert_eq!(
        r.serve(req::IN, 0, &[(HDR, 8, false), (STATUS, 1, true)]),
        (status::IOERR, 1)
    );
    // A readable descriptor after a writable one.
    assert_eq!(
        r.serve(
            req::OUT,
            0,
            &[
                (HDR, 16, false),
                (STATUS, 1, true),
                (DATA, 512, false),
                (STATUS, 1, true)
            ]
        ),
        (status::IOERR, 1)
    );
    // A data buffer outside guest memory (and one that wraps around).
    assert_eq!(
        r.serve(
            req::IN,
            0,
            &[(HDR, 16, false), (MEM - 256, 512, true), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(
        r.serve(
            req::OUT,
            0,
            &[
                (HDR, 16, false),
                (u64::MAX - 100, 512, false),
                (STATUS, 1, true)
            ]
        ),
        (status::IOERR, 1)
    );
    // A discard with a partial segment, and with two segments.
    assert_eq!(
        r.serve(
            req::DISCARD,
            0,
            &[(HDR, 16, false), (DATA, 10, false), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(
        r.serve(
            req::DISCARD,
            0,
            &[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(r.c().malformed, 8);

    // An unknown request type.
    assert_eq!(
        r.serve(77, 0, &[(HDR, 16, false), (STATUS, 1, true)]),
        (status::UNSUPP, 1)
    );
    assert_eq!(r.c().unsupported, 1);

    // No writable status byte: the chain goes back with nothing written
    // (the status descriptor is device-readable, or missing).
    assert_eq!(
        r.serve(
            req::OUT,
            0,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, false)]
        ),
        (0xff, 0)
    );
    assert_eq!(r.serve(req::FLUSH, 0, &[(HDR, 16, false)]), (0xff, 0));
    // The status descriptor itself outside guest memory.
    assert_eq!(
        r.serve(req::IN, 0, &[(HDR, 16, false), (MEM + 4096, 1, true)]),
        (0xff, 0)
    );
    assert_eq!(r.c().malformed, 11);
    assert_eq!(r.file(), before, "nothing was written");
    assert_eq!(r.c().write_ops, 0);
}

#[test]
fn a_read_only_disk_refuses_writes_discards_and_zeroes() {
    let r = Rig::new(true);
    let before = r.file();
    r.mem.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.serve(
            req::OUT,
            0,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&1u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    let chain = [(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)];
    assert_eq!(r.serve(req::DISCARD, 0, &chain), (status::IOERR, 1));
    assert_eq!(r.serve(req::WRITE_ZEROES, 0, &chain), (status::IOERR, 1));
    // Reads and flushes still work.
    assert_eq!(
        r.serve(
            req::IN,
            1,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]
        ),
        (status::OK, 513)
    );
    assert_eq!(
        r.serve(req::FLUSH, 0, &[(HDR, 16, false), (STATUS, 1, true)]),
        (status::OK, 1)
    );
    assert_eq!(r.c().read_only_writes, 3);
    assert_eq!(r.file(), before);
}

/// Many chains in one pass are served in order, and a backend failure is
/// an IOERR for that request alone.
#[test]
fn chains_are_served_in_order_and_backend_errors_are_io_errors() {
    let r = Rig::new(false);
    let mq = MockSplitQueue::new(&r.mem, 16);
    let mut q: Queue = mq.create_queue().unwrap();
    for i in 0..4u16 {
        let hdr = HDR + u64::from(i) * 32;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
        r.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        add_chain(
            &mq,
            i * 3,
            &[
                (hdr, 16, false),
                (DATA + u64::from(i) * 512, 512, true),
                (STATUS + u64::from(i), 1, true),
            ],
        );
    }
    let mut scratch = Scratch::default();
    process(
        &r.mem,
        &mut q,
        &r.disk,
        &r.counters,
        &mut scratch,
        &Throttle::default(),
    )
    .unwrap();
    let mut got = vec![0u8; 2048];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(0, 2048));
    let heads: Vec<u32> = (0..4)
        .map(|i| mq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    assert_eq!(heads, [0, 3, 6, 9]);
    assert!(q.iter(&r.mem).unwrap().next().is_none());

    // The file shrinks under the device: the read fails with IOERR.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&r.path)
        .unwrap()
        .set_len(512)
        .unwrap();
    assert_eq!(
        r.serve(
            req::IN,
            4,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(r.c().io_errors, 1);
}
