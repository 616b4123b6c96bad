//! The mpbridge command line.

use std::process::Command;

fn mpbridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpbridge"))
}

#[test]
fn help_marks_lab_options() {
    let out = mpbridge().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("--listen") && text.contains("--to") && text.contains("--idle-timeout"));
    assert_eq!(text.matches("LAB ONLY").count(), 3, "{text}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out =
        mpbridge().args(["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--lab-loss", "150"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--lab-loss"), "{err}");
    let out = mpbridge().args(["--listen", "127.0.0.1:0", "--to", "nohostport"]).output().unwrap();
    assert!(!out.status.success());
}
