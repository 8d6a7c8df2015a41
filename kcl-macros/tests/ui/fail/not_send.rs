use std::rc::Rc;

#[kcl::handler(bytes)]
async fn handle(data: Vec<u8>) {
    let shared = Rc::new(data);
    std::future::ready(()).await;
    let _ = shared;
}

fn main() {}
