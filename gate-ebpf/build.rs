use which::which;

/// Building this crate needs the `bpf-linker` binary, a dependency cargo cannot express. Rebuild
/// whenever it changes (the aya template's approach).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
