#[kcl::handler]
struct Handle;

fn main() {}
