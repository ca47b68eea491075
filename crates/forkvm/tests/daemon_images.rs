//! Kernel images: the host registers files (`forkvm serve --image NAME=KERNEL[,INITRD]`), an API
//! request boots one by name and can never name a path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use daemon_common::{forkvm, Daemon};
use serde_json::json;

#[test]
fn a_sandbox_boots_a_registered_kernel_image_by_name() {
    // The test guest is an ELF64 booted exactly like a Linux vmlinux: a real kernel image file.
    let dir = std::env::temp_dir().join(format!("forkvmd-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, test_guest::ELF).unwrap();
    let spec = format!("tg={}", kernel.display());
    let ready = format!("tg={}", test_guest::READY_LINE);
    let d = Daemon::start_with(
        "images",
        &["--image", &spec, "--image-cmdline", "tg=console=ttyS0", "--image-ready-line", &ready],
    );
    let t = d.token("acme");

    let listed = d.expect(200, "GET", "/v1/images", &t, None);
    assert_eq!(listed["images"], json!(["tg"]));

    let id = d.create(&t, json!({"image": "tg", "memory_mib": 32}));
    assert_eq!(d.line(&t, &id, "ping"), "pong");
    // It was booted from the file, not as the embedded test guest.
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", pid_of(&d, &t, &id))).unwrap();
    assert!(cmdline.contains(kernel.to_str().unwrap()), "{cmdline:?}");

    // Bad input: an unknown name (the answer lists what exists), a path, image with a template.
    let e = d.expect(404, "POST", "/v1/sandboxes", &t, Some(json!({"image": "debian"})));
    assert!(e["error"]["message"].as_str().unwrap().contains("tg"), "{e}");
    d.expect(404, "POST", "/v1/sandboxes", &t, Some(json!({"image": kernel.to_str().unwrap()})));
    d.expect(400, "POST", "/v1/sandboxes", &t, Some(json!({"image": 7})));
    let tpl = d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": id})));
    let e = d.expect(
        400,
        "POST",
        "/v1/sandboxes",
        &t,
        Some(json!({"image": "tg", "template": tpl["id"].as_str().unwrap()})),
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("image"), "{e}");

    // The host's flags are checked at start: a missing file or a bad name refuses to serve.
    for bad in [format!("tg={}", dir.join("nope").display()), format!("a/b={}", kernel.display())] {
        let out = forkvm(&dir.join("run2")).args(["serve", "--image", &bad]).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--image"), "{out:?}");
    }
    d.expect(204, "DELETE", &format!("/v1/sandboxes/{id}"), &t, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pid_of(d: &Daemon, t: &str, id: &str) -> u64 {
    d.expect(200, "GET", &format!("/v1/sandboxes/{id}"), t, None)["pid"].as_u64().unwrap()
}

/// `--image-disk NAME=PATH`: every sandbox of the image boots with its own copy-on-write view of
/// the disk (the test guest has no virtio driver: this proves the plumbing, the Linux e2e's
/// l2-preview.sh the data path), which hibernation and templates carry; the image is never
/// written, and only the host names the file.
#[test]
fn an_image_disk_goes_with_its_sandboxes_through_hibernation_and_templates() {
    let dir = std::env::temp_dir().join(format!("forkvmd-image-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, test_guest::ELF).unwrap();
    let disk = dir.join("disk.img");
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let spec = format!("tg={}", kernel.display());
    let ready = format!("tg={}", test_guest::READY_LINE);
    let dspec = format!("tg={}", disk.display());
    let d = Daemon::start_with(
        "image-disk",
        &[
            "--image",
            &spec,
            "--image-cmdline",
            "tg=console=ttyS0",
            "--image-ready-line",
            &ready,
            "--image-disk",
            &dspec,
        ],
    );
    let t = d.token("acme");
    let id = d.create(&t, json!({"image": "tg", "memory_mib": 32}));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid_of(&d, &t, &id))).unwrap();
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let at = args.iter().position(|a| a == "--disk").unwrap_or_else(|| panic!("no --disk in {args:?}"));
    assert_eq!(args[at + 1], format!("{},rw", disk.display()));
    assert_eq!(d.line(&t, &id, "ping"), "pong");

    // Hibernation keeps the disk's layers; the woken VMM has the disk again.
    d.expect(200, "POST", &format!("/v1/sandboxes/{id}/hibernate"), &t, None);
    assert_eq!(d.state(&t, &id), "hibernated");
    assert_eq!(d.line(&t, &id, "ping"), "pong");
    assert_eq!(d.state(&t, &id), "running");
    let status = forkvm(&d.run).args(["status", &id]).output().unwrap();
    assert!(status.status.success(), "{status:?}");
    // A template of it and a sandbox from the template.
    let tpl = d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": id})));
    let c = d.create(&t, json!({"template": tpl["id"].as_str().unwrap()}));
    assert_eq!(d.line(&t, &c, "ping"), "pong");
    for s in [&c, &id] {
        d.expect(204, "DELETE", &format!("/v1/sandboxes/{s}"), &t, None);
    }
    assert_eq!(std::fs::read(&disk).unwrap(), bytes, "the image's disk was written");

    // The host's flag is checked at start: a missing file, an unknown image, the same one twice.
    let missing = format!("tg={}", dir.join("nope.img").display());
    let other = format!("other={}", disk.display());
    let twice = [spec.as_str(), "--image-disk", &dspec, "--image-disk", &dspec];
    for bad in
        [vec![spec.as_str(), "--image-disk", &missing], vec![spec.as_str(), "--image-disk", &other], twice.to_vec()]
    {
        let out = forkvm(&dir.join("run2")).arg("serve").arg("--image").args(&bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--image"), "{out:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
