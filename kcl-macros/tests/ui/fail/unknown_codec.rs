#[kcl::handler(xml)]
async fn handle(data: Vec<u8>) {
    let _ = data;
}

fn main() {}
