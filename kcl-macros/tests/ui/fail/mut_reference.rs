#[derive(serde::Deserialize)]
struct Order {}

#[kcl::handler]
async fn handle(orders: &mut [Order]) {
    let _ = orders;
}

fn main() {}
