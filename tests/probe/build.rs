//! Links the probe with its own linker script (fixed physical layout).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg=-T{dir}/probe.ld");
    println!("cargo:rustc-link-arg=-zmax-page-size=4096");
    println!("cargo:rustc-link-arg=--no-rosegment");
    println!("cargo:rerun-if-changed=probe.ld");
}
