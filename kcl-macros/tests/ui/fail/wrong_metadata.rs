#[derive(serde::Deserialize)]
struct Order {}

#[kcl::handler]
async fn handle(orders: Vec<Order>, record: &kcl::Record) {
    let _ = (orders, record);
}

fn main() {}
