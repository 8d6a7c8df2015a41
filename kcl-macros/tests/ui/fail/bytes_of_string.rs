#[kcl::handler(bytes)]
async fn handle(line: String) {
    let _ = line;
}

fn main() {}
