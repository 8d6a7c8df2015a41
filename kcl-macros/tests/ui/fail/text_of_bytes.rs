#[kcl::handler(text)]
async fn handle(data: &[u8]) {
    let _ = data;
}

fn main() {}
