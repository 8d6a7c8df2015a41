//! The macros as users meet them: every supported form compiles (and the generated items
//! have the documented types), and each misuse fails with a message saying what to write
//! instead. The expected messages are in `ui/fail/*.stderr`; after changing a message, run
//! `TRYBUILD=overwrite cargo test -p kcl-macros --all-features --test ui` and review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
