//! Writes what the Debian package ships besides the binaries and conf/: man pages and
//! shell completions (bash, zsh, fish), generated from the programs' own clap
//! definitions, into `DIR/man` and `DIR/completions`.
//!
//! `mpt-package-assets target/release/assets` (see packaging/build-deb).

use clap::CommandFactory;
use std::path::{Path, PathBuf};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| {
        eprintln!("mpt-package-assets: {}: {e}", path.display());
        std::process::exit(1)
    });
}

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: mpt-package-assets DIR");
        std::process::exit(2)
    };
    let (man, completions) = (dir.join("man"), dir.join("completions"));
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    let programs = [
        ("mpclient", mpclient::cli::Cli::command()),
        ("mpserver", mpserver::cli::Cli::command()),
        ("mpbridge", bridge::cli::Cli::command()),
        ("mpvpn", vpn::cli::Cli::command()),
    ];
    for (name, cmd) in programs {
        let cmd = cmd.name(name);
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page).expect("render into memory");
        write(&man.join(format!("{name}.1")), &page);
        for (shell, file) in [
            (clap_complete::Shell::Bash, name.to_string()),
            (clap_complete::Shell::Zsh, format!("_{name}")),
            (clap_complete::Shell::Fish, format!("{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut out);
            write(&completions.join(file), &out);
        }
    }
    println!("man pages and completions in {}", dir.display());
}
