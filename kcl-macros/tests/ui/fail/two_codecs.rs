#[kcl::handler(json, text)]
async fn handle(s: String) {
    let _ = s;
}

fn main() {}
