//! `image convert --jobs N` beyond wasmtime's default pool (64 component
//! instances): the pool is sized from the job count, so 80 decoders on a
//! 2-core host convert a zlib qcow2 exactly as qemu-img does.

use std::process::Command;

use cocoon_format_common::test_support::skip;

#[test]
fn eighty_jobs_convert_like_qemu_img() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        skip("eighty_jobs_convert_like_qemu_img", "no qemu-img");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut bytes = vec![0u8; 32 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::try_from((i / 4096 * 7 + i / 13) % 256).expect("mod 256");
    }
    std::fs::write(&raw, &bytes).unwrap();
    let qcow = dir.path().join("src.qcow2");
    let ok = Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(ok.success());
    for jobs in ["80", "1"] {
        let out = dir.path().join(format!("out-{jobs}.raw"));
        let o = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
            .env("COCOON_STATE_DIR", dir.path().join("state"))
            .env("COCOON_CONFIG", "/dev/null")
            .args(["image", "convert", "--jobs", jobs])
            .arg(&qcow)
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "--jobs {jobs}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            std::fs::read(&out).unwrap() == bytes,
            "--jobs {jobs}: output differs"
        );
    }
}
