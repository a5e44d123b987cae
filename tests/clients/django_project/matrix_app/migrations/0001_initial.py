import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Author",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100, unique=True)),
                ("joined", models.DateTimeField(auto_now_add=True)),
            ],
        ),
        migrations.CreateModel(
            name="Book",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("title", models.CharField(max_length=200)),
                ("pages", models.IntegerField()),
                ("data", models.JSONField(default=dict)),
                ("author", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="books",
                                             to="matrix_app.author")),
            ],
            options={"constraints": [models.CheckConstraint(condition=models.Q(("pages__gt", 0)),
                                                            name="book_pages_positive")]},
        ),
    ]
