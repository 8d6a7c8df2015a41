#[kcl::handler(json)]
async fn handle(batch: Vec<bytes::Bytes>) {
    let _ = batch;
}

fn main() {}
