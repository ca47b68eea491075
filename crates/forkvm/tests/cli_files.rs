//! KVM tier: the run directory, VM directories, sockets, pid files and logs are private (0700 /
//! 0600) whatever the umask, and forkvm never writes through a planted symlink.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::Env;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o777
}

/// Runs forkvm with umask 000; it must succeed.
fn ok_umask0(env: &Env, args: &[&str]) {
    let mut c = env.command(args);
    let umask0 = || {
        // SAFETY: umask is async-signal-safe and has no preconditions.
        unsafe { libc::umask(0) };
        Ok(())
    };
    // SAFETY: the hook only calls umask, which is async-signal-safe.
    unsafe { c.pre_exec(umask0) };
    let out = c.output().unwrap();
    assert!(out.status.success(), "forkvm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn files_are_private_whatever_the_umask() {
    let mut env = Env::new("modes");
    std::fs::set_permissions(&env.run, std::fs::Permissions::from_mode(0o777)).unwrap();
    ok_umask0(&env, &["run", "--guest", "test", "--mem", "64M", "--name", "m", "--detach"]);
    env.names.push("m".into());
    assert_eq!(env.exec("m", "ping"), "pong");
    ok_umask0(&env, &["fork", "m"]);
    assert_eq!(env.exec("m-c1", "ping"), "pong");
    assert_eq!(mode(&env.run), 0o700, "run dir");
    for vm in ["m", "m-c1"] {
        let d = env.run.join(vm);
        assert_eq!(mode(&d), 0o700, "{vm} dir");
        for f in ["api.sock", "pid", "console.log", "vmm.log"] {
            assert_eq!(mode(&d.join(f)), 0o600, "{vm}/{f}");
        }
    }
}

#[test]
fn planted_symlinks_are_never_followed() {
    let mut env = Env::new("links");
    let victims = env.run.with_extension("victims");
    let _ = std::fs::remove_dir_all(&victims);
    std::fs::create_dir_all(&victims).unwrap();
    // Symlinks where a VM's files go: the files are created in place, the targets untouched.
    let d = env.run.join("s");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["console.log", "vmm.log", "pid"] {
        std::fs::write(victims.join(f), b"precious").unwrap();
        std::os::unix::fs::symlink(victims.join(f), d.join(f)).unwrap();
    }
    env.start("s", &[]);
    for f in ["console.log", "vmm.log", "pid"] {
        assert_eq!(std::fs::read(victims.join(f)).unwrap(), b"precious", "{f} was written through");
        assert!(std::fs::symlink_metadata(d.join(f)).unwrap().is_file(), "{f}");
    }
    // A VM directory that is a symlink is refused.
    std::os::unix::fs::symlink(&victims, env.run.join("t")).unwrap();
    env.fails(&["run", "--guest", "test", "--mem", "64M", "--name", "t", "--detach"], "symlink");
    std::os::unix::fs::symlink(&victims, env.run.join("t1")).unwrap();
    env.fails(&["fork", "s", "--prefix", "t"], "symlink");
    assert!(std::fs::read_dir(&victims).unwrap().count() == 3, "nothing created in the symlink's target");
    // So is a run directory that is a symlink.
    let link = env.run.with_extension("runlink");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&victims, &link).unwrap();
    let out =
        env.command(&["run", "--guest", "test", "--mem", "64M", "--name", "u"]).env("FORKVM_RUN_DIR", &link).output();
    let out = out.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_dir(&victims).unwrap().count() == 3);
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_file(env.run.join("t")).unwrap();
    std::fs::remove_file(env.run.join("t1")).unwrap();
    std::fs::remove_dir_all(&victims).unwrap();
}
