//! Hand-built images: valid layouts and the hostile ones of the issue.
//! Each hostile image must end in a clear error (or a bounded, checked map),
//! never a panic or an unbounded walk.

use super::*;
use cocoon_format_common::test_support::Rng;

/// An image opened over its bytes, with the source bound for `map`.
struct Opened {
    src: Vec<u8>,
    img: Qcow2,
}

impl Opened {
    fn map(&self, offset: u64, max: u32) -> Result<Vec<Extent>, FormatError> {
        self.img.map(&self.src, offset, max as usize)
    }
}

impl std::ops::Deref for Opened {
    type Target = Qcow2;
    fn deref(&self) -> &Qcow2 {
        &self.img
    }
}

fn open(src: Vec<u8>) -> Result<Opened, FormatError> {
    let img = Qcow2::open(&src)?;
    Ok(Opened { src, img })
}

const CB: u32 = 16;
const CLUSTER: u64 = 1 << CB;

/// A version-3 image with 64 KiB clusters: header in cluster 0, the L1
/// table in cluster 1, one L2 table in cluster 2, `data_clusters` data
/// clusters from cluster 3 (filled with their index).
struct Builder {
    bytes: Vec<u8>,
}

impl Builder {
    fn new(size: u64, data_clusters: u64) -> Self {
        let mut bytes = vec![0u8; ((3 + data_clusters) * CLUSTER) as usize];
        bytes[..4].copy_from_slice(&MAGIC);
        let mut b = Builder { bytes: Vec::new() };
        std::mem::swap(&mut b.bytes, &mut bytes);
        b.set32(4, 3);
        b.set32(20, CB);
        b.set64(24, size);
        let l1 = size.div_ceil(CLUSTER * (CLUSTER / 8));
        b.set32(36, l1 as u32);
        b.set64(40, CLUSTER);
        b.set32(96, 4);
        b.set32(100, 104);
        for i in 0..data_clusters {
            let at = ((3 + i) * CLUSTER) as usize;
            b.bytes[at..at + CLUSTER as usize].fill(i as u8 + 1);
        }
        b
    }
    fn set32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set64(&mut self, at: usize, v: u64) {
        self.bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn l1(&mut self, index: usize, v: u64) -> &mut Self {
        self.set64((CLUSTER as usize) + index * 8, v);
        self
    }
    fn l2(&mut self, index: usize, v: u64) -> &mut Self {
        self.set64(2 * CLUSTER as usize + index * 8, v);
        self
    }
    fn with_l2(mut self) -> Self {
        self.l1(0, (2 * CLUSTER) | (1 << 63));
        self
    }
    fn open(&self) -> Result<Opened, FormatError> {
        open(self.bytes.clone())
    }
}

fn data_cluster(i: u64) -> u64 {
    (3 + i) * CLUSTER
}

/// The whole map, page by page, with a bound on the number of calls.
fn full_map(img: &Opened, max: u32) -> Result<Vec<Extent>, FormatError> {
    let mut out = Vec::new();
    let mut pos = 0;
    for _ in 0..100_000 {
        let page = img.map(pos, max)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        assert_eq!(page[0].offset, pos, "pages are contiguous");
        pos = last.offset + last.length;
        out.extend(page);
    }
    panic!("map did not end");
}

fn err_of(r: Result<Opened, FormatError>) -> FormatError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn maps_data_zero_unallocated_and_compressed() {
    let mut b = Builder::new(10 * CLUSTER + 1024, 3).with_l2();
    b.l2(0, data_cluster(0) | 1 << 63)
        .l2(1, data_cluster(1))
        .l2(2, L2_ZERO)
        .l2(3, data_cluster(2) | L2_ZERO);
    // A compressed cluster at data cluster 2 + 100, 3 sectors.
    let shift = 62 - (CB - 8);
    b.l2(5, L2_COMPRESSED | (2 << shift) | (data_cluster(2) + 100));
    b.l2(10, data_cluster(2));
    let img = b.open().unwrap();
    assert_eq!(img.virtual_size(), 10 * CLUSTER + 1024);
    let map = full_map(&img, 100).unwrap();
    let want = vec![
        Extent {
            offset: 0,
            length: 2 * CLUSTER,
            run: Run::Data(data_cluster(0)),
        },
        Extent {
            offset: 2 * CLUSTER,
            length: 3 * CLUSTER,
            run: Run::Zero,
        },
        Extent {
            offset: 5 * CLUSTER,
            length: CLUSTER,
            run: Run::Compressed {
                source_offset: data_cluster(2) + 100,
                source_length: 3 * 512 - 100,
                codec: CODEC_DEFLATE,
            },
        },
        Extent {
            offset: 6 * CLUSTER,
            length: 4 * CLUSTER,
            run: Run::Zero,
        },
        // The last cluster is cut at the virtual size.
        Extent {
            offset: 10 * CLUSTER,
            length: 1024,
            run: Run::Data(data_cluster(2)),
        },
    ];
    assert_eq!(map, want);
    // Small pages give the same map, cut differently.
    let mut small = full_map(&img, 1).unwrap();
    let mut merged = Vec::new();
    for e in small.drain(..) {
        push_merged(&mut merged, e);
    }
    assert_eq!(merged, want);
    // A start inside a data cluster.
    let page = img.map(CLUSTER + 10, 1).unwrap();
    assert_eq!(
        page,
        vec![Extent {
            offset: CLUSTER + 10,
            length: CLUSTER - 10,
            run: Run::Data(data_cluster(1) + 10)
        }]
    );
}

#[test]
fn a_size_that_is_not_whole_sectors_is_cut_to_whole_sectors() {
    // qemu reads `size / 512` sectors: the 488 bytes past the last whole
    // sector are not part of the disk (host/tests/convert_conformance.rs
    // checks the same image against qemu-img itself).
    let mut b = Builder::new(1000, 1).with_l2();
    b.l2(0, data_cluster(0));
    let img = b.open().unwrap();
    assert_eq!(img.virtual_size(), 512);
    assert_eq!(
        full_map(&img, 10).unwrap(),
        vec![Extent {
            offset: 0,
            length: 512,
            run: Run::Data(data_cluster(0)),
        }]
    );
    let tiny = Builder::new(511, 0).open().unwrap();
    assert_eq!(tiny.virtual_size(), 0);
    assert_eq!(full_map(&tiny, 10).unwrap(), vec![]);
}

#[test]
fn dirty_and_lazy_refcounts_are_readable() {
    let mut b = Builder::new(CLUSTER, 1).with_l2();
    b.l2(0, data_cluster(0));
    b.set64(72, 1); // dirty
    b.set64(80, 1); // lazy refcounts
    let img = b.open().unwrap();
    assert!(img.header().dirty && img.header().lazy_refcounts);
    assert_eq!(
        full_map(&img, 10).unwrap()[0].run,
        Run::Data(data_cluster(0))
    );
}

#[test]
fn refused_features_say_what_they_are() {
    let cases: &[(usize, u64, &str, ErrorKind)] = &[
        (72, 1 << 2, "external data file", ErrorKind::Unsupported),
        (72, 1 << 1, "corrupt", ErrorKind::InvalidInput),
        (
            72,
            1 << 9,
            "unknown incompatible feature bits 0x200",
            ErrorKind::Unsupported,
        ),
    ];
    for (at, v, want, kind) in cases {
        let mut b = Builder::new(CLUSTER, 0);
        b.set64(*at, *v);
        let e = err_of(b.open());
        assert!(e.message.contains(want), "{want}: {e}");
        assert_eq!(e.kind, *kind);
    }
    let mut b = Builder::new(CLUSTER, 0);
    b.set32(32, 2);
    let e = err_of(b.open());
    assert!(
        e.message.contains("encrypted") && e.kind == ErrorKind::Unsupported,
        "{e}"
    );
}

#[test]
fn cluster_bits_out_of_range() {
    for bits in [0, 8, 22, 63, u32::MAX] {
        let mut b = Builder::new(CLUSTER, 0);
        b.set32(20, bits);
        let e = err_of(b.open());
        assert!(
            e.message.contains(&format!("cluster_bits is {bits}")),
            "{e}"
        );
    }
}

#[test]
fn l1_table_past_eof() {
    let mut b = Builder::new(CLUSTER, 0);
    b.set64(40, 1 << 40);
    let e = err_of(b.open());
    assert!(
        e.message.contains("L1 table") && e.message.contains("past the end"),
        "{e}"
    );
    b.set64(40, !(CLUSTER - 1));
    assert!(err_of(b.open()).message.contains("past the end"));
}

#[test]
fn l2_offset_past_eof() {
    let mut b = Builder::new(CLUSTER, 0);
    b.l1(0, 1 << 40);
    let img = b.open().unwrap();
    let e = img.map(0, 10).unwrap_err();
    assert!(
        e.message.contains("L2 table") && e.message.contains("past the end"),
        "{e}"
    );
}

#[test]
fn compressed_cluster_past_eof() {
    let mut b = Builder::new(CLUSTER, 0).with_l2();
    let shift = 62 - (CB - 8);
    b.l2(0, L2_COMPRESSED | (1 << shift) | (1 << 30));
    let e = b.open().unwrap().map(0, 10).unwrap_err();
    assert!(
        e.message.contains("compressed data") && e.message.contains("past the end"),
        "{e}"
    );
}

#[test]
fn l2_entries_pointing_into_the_header() {
    let shift = 62 - (CB - 8);
    for (entry, want) in [
        (L2_COMPRESSED | 16, "inside the header cluster"),
        (L2_COMPRESSED | (1 << shift), "inside the header cluster"),
        (0x200, "not cluster-aligned"),
    ] {
        let mut b = Builder::new(CLUSTER, 0).with_l2();
        b.l2(0, entry);
        let e = b.open().unwrap().map(0, 10).unwrap_err();
        assert!(e.message.contains(want), "{want}: {e}");
    }
    let mut b = Builder::new(CLUSTER, 0);
    b.l1(0, 0x200);
    let e = b.open().unwrap().map(0, 10).unwrap_err();
    assert!(e.message.contains("not aligned"), "{e}");
}

#[test]
fn huge_virtual_size_on_a_tiny_file() {
    for size in [1u64 << 62, u64::MAX, 1 << 50] {
        let mut b = Builder::new(CLUSTER, 0);
        b.set64(24, size);
        let e = err_of(b.open());
        assert!(
            e.message.contains("l1_size") || e.message.contains("limit"),
            "{size}: {e}"
        );
        // Even with l1_size matching, the table is not in the file.
        b.set32(36, u32::MAX);
        let e = err_of(b.open());
        assert!(
            e.message.contains("l1_size")
                || e.message.contains("limit")
                || e.message.contains("past the end"),
            "{size}: {e}"
        );
    }
}

#[test]
fn a_large_empty_image_maps_in_one_extent() {
    // 1 TiB needs 2048 L1 entries, all zero.
    let mut b = Builder::new(1 << 40, 0);
    b.set32(36, 2048);
    let img = b.open().unwrap();
    assert_eq!(
        full_map(&img, 4096).unwrap(),
        vec![Extent {
            offset: 0,
            length: 1 << 40,
            run: Run::Zero
        }]
    );
}

#[test]
fn truncated_headers() {
    let b = Builder::new(CLUSTER, 0);
    for len in [0, 4, 8, 71, 72, 100, 103] {
        let e = err_of(open(b.bytes[..len].to_vec()));
        assert!(
            e.message.contains("truncated header") || e.message.contains("magic"),
            "{len}: {e}"
        );
    }
}

#[test]
fn backing_names_are_read_and_checked() {
    let mut b = Builder::new(CLUSTER, 0);
    let name = b"../../etc/passwd";
    b.bytes[200..200 + name.len()].copy_from_slice(name);
    b.set64(8, 200);
    b.set32(16, name.len() as u32);
    let img = b.open().unwrap();
    // The parser reports the name; refusing it is the host's job.
    assert_eq!(img.backing(), Some("../../etc/passwd"));
    assert_eq!(full_map(&img, 10).unwrap()[0].run, Run::Backing);
    b.set64(8, CLUSTER - 4);
    assert!(err_of(b.open()).message.contains("backing file name"));
    b.set64(8, 200);
    b.set32(16, 5000);
    assert!(err_of(b.open()).message.contains("backing_file_size"));
}

#[test]
fn extended_l2_subclusters() {
    let mut b = Builder::new(CLUSTER, 1).with_l2();
    b.set64(72, 1 << 4);
    // 16-byte entries: entry, bitmap. Subclusters of 2 KiB.
    b.l2(0, data_cluster(0));
    let alloc: u64 = 0b0011; // subclusters 0, 1
    let zero: u64 = 0b0100; // subcluster 2
    b.l2(1, alloc | zero << 32);
    let img = b.open().unwrap();
    let map = full_map(&img, 100).unwrap();
    assert_eq!(
        map,
        vec![
            Extent {
                offset: 0,
                length: 4096,
                run: Run::Data(data_cluster(0))
            },
            Extent {
                offset: 4096,
                length: CLUSTER - 4096,
                run: Run::Zero
            },
        ]
    );
    b.l2(1, 1 | 1 << 32);
    assert!(b
        .open()
        .unwrap()
        .map(0, 10)
        .unwrap_err()
        .message
        .contains("both allocated and zero"));
}

#[test]
fn data_runs_must_end_inside_the_file() {
    // The file stops 4 KiB into the only data cluster.
    let mut b = Builder::new(CLUSTER, 1).with_l2();
    b.l2(0, data_cluster(0));
    b.bytes.truncate((data_cluster(0) + 4096) as usize);
    let e = b.open().unwrap().map(0, 10).unwrap_err();
    assert!(e.message.contains("past the end"), "{e}");
    // With extended L2, a subcluster past the end (found by the fuzzer).
    let mut b = Builder::new(CLUSTER, 1).with_l2();
    b.set64(72, 1 << 4);
    b.l2(0, data_cluster(0));
    b.l2(1, 1 | 1 << 31);
    b.bytes.truncate((data_cluster(0) + 4096) as usize);
    let img = b.open().unwrap();
    let e = img.map(0, 10).unwrap_err();
    assert!(e.message.contains("past the end"), "{e}");
}

#[test]
fn random_bytes_after_a_valid_magic() {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut next = || rng.next();
    let mut opened = 0;
    for round in 0..3000 {
        let len = 72 + (next() % 4096) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        bytes[..4].copy_from_slice(&MAGIC);
        // Some rounds get a plausible version and cluster size, so the walk
        // gets past the first checks.
        if round % 2 == 0 {
            bytes[4..8].copy_from_slice(&(2 + (round % 4 / 2) as u32).to_be_bytes());
            bytes[20..24].copy_from_slice(&(9 + (next() % 13) as u32).to_be_bytes());
            bytes[32..36].fill(0);
        }
        if let Ok(img) = open(bytes) {
            opened += 1;
            let _ = full_map(&img, 64);
        }
    }
    let _ = opened;
}
