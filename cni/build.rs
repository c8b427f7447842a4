//! Lets the plugin find libnftnl and libmnl in `istio-capture-cni.libs/` beside itself: the
//! installer copies them there, since nodes rarely have them. DT_RPATH (not RUNPATH) so that
//! libnftnl's own need for libmnl is looked up there too; a missing directory is skipped.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--disable-new-dtags,-rpath,$ORIGIN/istio-capture-cni.libs");
}
