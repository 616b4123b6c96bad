//! The mpclient command line: help, keys, and one-line errors for bad input.

use std::process::Command;

fn mpclient() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpclient"))
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mpclient-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected failure");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn help_explains_both_forms() {
    let out = mpclient().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for word in ["bridges", "--config", "--key-file", "genkey", "status", "--listen"] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[test]
fn no_key_says_how_to_make_one() {
    let d = tmpdir("nokey");
    std::fs::write(d.join("b.conf"), "127.0.0.1 4000\n").unwrap();
    let err = run_err(mpclient().arg(d.join("b.conf")).env_remove("MPT_KEY_FILE"));
    assert!(err.contains("no key given") && err.contains("genkey"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_bridges_file_names_the_line() {
    let d = tmpdir("bridges");
    std::fs::write(d.join("b.conf"), "# ok\n127.0.0.1 4000\n127.0.0.1\n").unwrap();
    let err = run_err(mpclient().arg(d.join("b.conf")));
    assert!(err.contains("b.conf:3:"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_yaml_names_field_and_line() {
    let d = tmpdir("yaml");
    std::fs::write(d.join("c.yaml"), "listen: 127.0.0.1:3000\npaths:\n  - remote: a:1\n    interfce: eth0\n").unwrap();
    let err = run_err(mpclient().arg("-c").arg(d.join("c.yaml")));
    assert!(err.contains("c.yaml:4") && err.contains("interfce"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn genkey_writes_a_private_key_file_and_prints_one() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmpdir("genkey");
    let k = d.join("k");
    assert!(mpclient().arg("genkey").arg(&k).status().unwrap().success());
    assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!mpclient().arg("genkey").arg(&k).status().unwrap().success(), "never overwrites");
    let out = mpclient().arg("genkey").output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim().len(), 44);
}

#[test]
fn status_without_daemon_is_a_clear_error() {
    let d = tmpdir("status");
    let err = run_err(mpclient().args(["status", "--control"]).arg(d.join("none.sock")));
    assert!(err.contains("is it running"), "{err}");
}
