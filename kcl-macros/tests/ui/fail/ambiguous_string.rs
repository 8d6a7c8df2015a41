#[kcl::handler]
async fn handle(line: String) {
    let _ = line;
}

fn main() {}
