//! Writes the CRD YAML of the contract into `charts/portsentry/crds/` (or the folder given as
//! the first argument). The drift test compares the committed files with this output.
#![forbid(unsafe_code)]

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let dir = env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/portsentry/crds")
    });
    let files = match portsentry_crds::crd_files() {
        Ok(files) => files,
        Err(error) => {
            eprintln!("crdgen: could not serialise the CRDs: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {error}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, body) in files {
        let path = dir.join(&name);
        if let Err(error) = fs::write(&path, body) {
            eprintln!("crdgen: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
