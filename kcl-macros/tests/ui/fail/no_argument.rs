#[kcl::handler]
async fn handle() {}

fn main() {}
