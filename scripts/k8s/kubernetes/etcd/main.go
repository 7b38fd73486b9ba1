// Command etcd is etcd's own main (go.etcd.io/etcd/v3's main.go) built inside this module, so
// that it uses the etcd server version and the dependency versions Kubernetes itself pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
