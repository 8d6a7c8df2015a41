#[kcl::handler("json")]
async fn handle(data: Vec<u8>) {
    let _ = data;
}

fn main() {}
