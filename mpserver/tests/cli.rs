//! The mpserver command line: mptunnel's form, help, keys, and one-line errors.

use std::process::Command;

fn mpserver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpserver"))
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mpserver-cli-{name}-{}", std::process::id()));
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
fn help_shows_the_mptunnel_form() {
    let out = mpserver().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for word in ["LISTEN_PORT", "TARGET_HOST", "TARGET_PORT", "--config", "--key-file", "genkey", "status"] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[test]
fn no_key_says_how_to_make_one() {
    let err = run_err(mpserver().args(["4000", "127.0.0.1", "1194"]).env_remove("MPT_KEY_FILE"));
    assert!(err.contains("no key given") && err.contains("mpserver genkey"), "{err}");
}

#[test]
fn incomplete_positional_form_is_refused() {
    let out = mpserver().args(["4000", "127.0.0.1"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn bad_yaml_names_field_and_line() {
    let d = tmpdir("yaml");
    std::fs::write(d.join("s.yaml"), "listen: 0.0.0.0:4000\ntarget: 127.0.0.1:1194\nmax_paths_per_session: 0\n")
        .unwrap();
    let err = run_err(mpserver().arg("-c").arg(d.join("s.yaml")));
    assert!(err.contains("s.yaml:3: max_paths_per_session"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn loose_key_permissions_warn() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmpdir("perm");
    let k = d.join("k");
    assert!(mpserver().arg("genkey").arg(&k).status().unwrap().success());
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    // An unusable listen port makes it exit right after loading the key.
    let out = mpserver()
        .args(["--key-file"])
        .arg(&k)
        .args(["--control"])
        .arg(d.join("c.sock"))
        .args(["-c"])
        .arg({
            std::fs::write(d.join("s.yaml"), "listen: 203.0.113.1:4000\ntarget: 127.0.0.1:9\n").unwrap();
            d.join("s.yaml")
        })
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(err.contains("loose permissions"), "{err}");
}
